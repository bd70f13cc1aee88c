"""What the command-line entry points share: server flags and their checks, job resources,
time limits."""

import argparse
import sys

from servegen.cluster.config import ClusterConfig, Resources, check_cpus, check_memory, parse_slurm_time
from servegen.errors import ServegenError
from servegen.generation.config import FLAGS
from servegen.server.command import ServerCommand, ServerSpec, split_args


SERVER_KEYS = ("server.model", "server.server_type", "server.gpus", "server.nodes", "server.args")
STARTING_A_SERVER_NEEDS = ("server.model", "server.server_type", "server.gpus")


def add_config_flags(parser: argparse.ArgumentParser, keys: tuple[str, ...], required: tuple[str, ...] = (),
                     given_only: bool = False) -> None:
    """The flags of these job config keys, as declared beside the keys (generation/config.py).
    given_only: a flag not given is None (`flag_values` leaves it out), not the key's default."""
    for key in keys:
        setting = FLAGS[key]
        kwargs = dict(setting.metadata["argparse"], help=setting.metadata["help"])
        if key in required:
            kwargs["required"] = True
        elif setting.default not in (None, "", False) and "default" not in kwargs["help"]:
            kwargs["help"] += f" (default: {setting.default})"
        default = None if given_only or kwargs.get("action") == "store_true" else setting.default
        parser.add_argument(setting.metadata["flag"], dest=_dest(key), default=default, **kwargs)


def flag_values(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, object]:
    """The config values of the flags given (`given_only` flags), keyed by config key."""
    out = {}
    for key in keys:
        text = getattr(args, _dest(key))
        if text is not None and text is not False:  # (0 is a value)
            parse = FLAGS[key].metadata["parse"]
            out[key] = parse(text, FLAGS[key].metadata["flag"]) if parse else text
    return out


def _dest(key: str) -> str:
    return FLAGS[key].metadata["flag"].removeprefix("--")


def add_server_flags(parser: argparse.ArgumentParser, starts_here: bool) -> None:
    """starts_here: start_server's (the server's flags required); else generate's (given or not)."""
    if starts_here:
        add_config_flags(parser, SERVER_KEYS, required=STARTING_A_SERVER_NEEDS)
    else:
        add_config_flags(parser, SERVER_KEYS, given_only=True)
    # start_server's: the job's own server always listens on a free port of 127.0.0.1
    parser.add_argument("--server_port", type=int, help="port to listen on (default: a free one)")
    parser.add_argument(
        "--server_host",
        help="address to listen on (default: 127.0.0.1 locally, 0.0.0.0 on Slurm so other nodes reach it)",
    )


def server_spec_from_flags(args: argparse.Namespace, host: str, port: int) -> ServerSpec:
    extra = split_args(args.server_args)
    # the readiness probe and the printed address must agree with where the server listens
    for a in extra:
        for name, flag in (("port", "--server_port"), ("host", "--server_host")):
            if a in (f"--{name}", f"-{name}") or a.startswith((f"--{name}=", f"{name}=")):
                raise ServegenError(f"--server_args must not set the {name}; use {flag}")
    return ServerSpec(
        server_type=args.server_type,
        model=args.model,
        gpus=args.server_gpus,
        nodes=args.server_nodes,
        port=port,
        host=host,
        args=extra,
    )


def parse_time_limit(text: str, flag: str = "--time_limit") -> int:
    """Minutes from a number of minutes or a Slurm time (04:00:00, 1-00:00:00)."""
    try:
        return parse_slurm_time(text)
    except ValueError:
        raise ServegenError(f"{flag} must be minutes or a Slurm time like 04:00:00, got {text!r}") from None


PORT_SHOWN = 5000  # in a dry run, for the free port a job's server picks


def head_ports_note(command: ServerCommand) -> str:
    """A dry run's line on the ports the server's script reads from its head node ("" if none)."""
    if not command.head_ports:
        return ""
    names = ", ".join(f"${name}" for name in command.head_ports)
    defaults = ", ".join(map(str, command.head_ports.values()))
    return f"# {names}: ports free on the head node, picked as the server starts ({defaults} in an --exclusive job)\n"


def add_resource_flags(parser: argparse.ArgumentParser) -> None:
    """CPUs and memory of a Slurm job; each wins over its key in the cluster config."""
    parser.add_argument("--cpus_per_task", type=int, help="CPUs of the job's one task per node (default: the config's cpus_per_task)")
    parser.add_argument("--mem", help="memory per node, e.g. 256G, 0 for all of it (default: the config's mem)")
    parser.add_argument("--mem_per_gpu", help="memory per GPU instead of --mem, e.g. 80G (default: the config's)")
    parser.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job (config: exclusive)")


def resources_from(args: argparse.Namespace, cluster: ClusterConfig) -> Resources:
    given = [f"--{k}" for k in ("cpus_per_task", "mem", "mem_per_gpu", "exclusive") if getattr(args, k) not in (None, False)]
    if given and cluster.executor != "slurm":
        raise ServegenError(f"{' '.join(given)}: for Slurm jobs; cluster '{cluster.name}' runs on this machine")
    if args.mem is not None and args.mem_per_gpu is not None:
        raise ServegenError("give --mem or --mem_per_gpu, not both")
    return cluster.resources.overridden(
        cpus_per_task=None if args.cpus_per_task is None else check_cpus(args.cpus_per_task, "--cpus_per_task"),
        mem=None if args.mem is None else check_memory(args.mem, "--mem"),
        mem_per_gpu=None if args.mem_per_gpu is None else check_memory(args.mem_per_gpu, "--mem_per_gpu"),
        exclusive=args.exclusive,
    )


def add_run_after_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run_after", action="append", default=[],
                        help="start after the jobs of this experiment name finish (Slurm; repeatable)")


def run_after_ids(names: list[str], cluster: ClusterConfig) -> list[str]:
    """The Slurm job ids of the experiments named (their follow-ups too); one that has none is
    said, not waited for."""
    from servegen.cluster.slurm import jobs_named

    ids = []
    for name in names:
        found = jobs_named(cluster.job_name_prefix + name)
        if not found:
            print(f"servegen: no pending or running job named {cluster.job_name_prefix}{name}; not waiting for it",
                  file=sys.stderr)
        ids += found
    return ids
