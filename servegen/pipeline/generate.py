"""python -m servegen.pipeline.generate: run a generation job over a JSONL dataset, with a model
server started in the same job (--model/--server_type/--server_gpus) or an existing one
(--server_address), on this machine or as Slurm jobs (chunks as a job array, follow-up jobs that
resume where a timed-out one stopped). Arguments like ++key=value change the job config (see
servegen/generation/config.py and docs/generation.md)."""

from servegen.cli import exit_on_signals, run_main

if __name__ == "__main__":
    exit_on_signals()  # a signal while the imports below run ends us at once: nothing has started yet

import argparse
import sys
from pathlib import Path

from servegen.cluster.config import ClusterConfig, load_cluster_config
from servegen.cluster.jobs import JobFailed, JobSpec, local_commands_text, run_local
from servegen.errors import ServegenError
from servegen.generation.config import FLAGS, GenerationConfig, build_config, setting_name, to_overrides
from servegen.overrides import parse_overrides
from servegen.generation.colocated import co_located_spec
from servegen.generation.job import Job
from servegen.generation.outputs import Unit, forget_outputs, merge_finished, output_done, output_locks
from servegen.generation.job import main as job_main  # what a local job's forked child runs
from servegen.pipeline.common import (
    PORT_SHOWN,
    add_config_flags,
    add_resource_flags,
    add_run_after_flag,
    add_server_flags,
    flag_values,
    head_ports_note,
    parse_time_limit,
    resources_from,
    run_after_ids,
)
from servegen.server.command import split_args



def _sampling_help() -> str:
    """The sampling overrides, from their one declaration; the rest: docs/generation.md."""
    from servegen.inference.params import SAMPLING

    lines = ["sampling (++inference.<name>=<value>):"]
    for name, setting in SAMPLING.items():
        default = "unset" if setting.default is None else setting.default
        lines.append(f"  {name} (default {default}): {setting.metadata['doc']}")
    return "\n".join(lines + ["every other key of the job config: docs/generation.md"])


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="servegen generate",
        description="Generate over a JSONL dataset; ++key=value arguments change the job config.",
        epilog=_sampling_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser, ("cluster", "config_dir"))
    add_config_flags(parser, ("input_file", "output_dir"), required=("input_file", "output_dir"))
    add_server_flags(parser, starts_here=False)
    add_config_flags(parser, ("server.address",), given_only=True)
    parser.add_argument("--expname", default="generate", help="experiment name: the Slurm job name after the prefix")
    add_config_flags(parser, ("num_chunks", "chunk_ids"), given_only=True)
    parser.add_argument("--num_random_seeds", type=int, help="K generations with seeds starting_seed..+K-1")
    parser.add_argument("--starting_seed", type=int, default=0, help="first seed of --num_random_seeds (default 0)")
    add_config_flags(parser, ("random_seeds",), given_only=True)
    parser.add_argument("--dependent_jobs", type=int, default=0,
                        help="N follow-up jobs that resume where a timed-out one stopped (Slurm)")
    add_run_after_flag(parser)
    parser.add_argument("--partition", help="Slurm partition (default: the cluster config's)")
    parser.add_argument("--time_limit", help="job time limit, minutes or a Slurm time (default: the config's)")
    add_resource_flags(parser)
    parser.add_argument("--time_min", help="sbatch --time-min: Slurm may shorten the limit down to this")
    add_config_flags(parser, ("log_dir", "rerun_done"), given_only=True)
    parser.add_argument("--dry_run", action="store_true", help="print every sbatch script or local command and exit")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not (a.startswith("+") or "=" in a and not a.startswith("-"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (job config changes look like ++key=value)")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    return run_main(_generate, argv)


def _generate(argv: list[str] | None) -> int:
    args, overrides = parse_args(argv)
    cluster = load_cluster_config(args.cluster, args.config_dir)
    resources = resources_from(args, cluster)
    cfg = _job_config(args, cluster, overrides)
    typed = {key for key, _ in parse_overrides(overrides)}
    units = Job(cfg).units  # checks the whole config here, before anything runs or queues
    # here, not in the jobs: a requeued or follow-up job must keep what its first run wrote
    rerun_done, cfg.rerun_done = cfg.rerun_done, False
    if rerun_done and not args.dry_run and Path(cfg.output_dir).is_dir():
        with output_locks(Path(cfg.output_dir), units):  # not under a job that writes them now
            forget_outputs(Path(cfg.output_dir), units)
    if cluster.executor == "local":
        return _run_here(args, cfg, cluster, typed)
    return _submit(args, cfg, cluster, resources, typed, units, rerun_done)


def _run_here(args, cfg: GenerationConfig, cluster: ClusterConfig, typed: set[str]) -> int:
    """One job on this machine: every unit in turn, in a forked child (or the dry run's command)."""
    if args.dependent_jobs or args.run_after:
        raise ServegenError("--dependent_jobs and --run_after need a Slurm cluster; locally jobs run in order")
    job = JobSpec(name=args.expname, commands=[_command(cfg, typed)], env=cluster.env_vars, log_dir=Path(cfg.log_dir))
    if args.dry_run:
        print(local_commands_text(job), end="")
        _print_server_launch(cfg, cluster, in_slurm=False)
        return 0
    try:
        run_local(job, body=job_main)
    except JobFailed as e:
        if e.code < 0:  # killed by a signal: it could not say why
            raise
        return e.code  # the job printed its own one-line error
    return 0


def _submit(args, cfg: GenerationConfig, cluster: ClusterConfig, resources, typed: set[str], units: list[Unit],
            rerun_done: bool) -> int:
    """The units not done as a Slurm job (an array of one task per unit), then its follow-ups."""
    from servegen.cluster import slurm

    if not args.dry_run:
        merge_finished(Path(cfg.output_dir), units)
    todo = units if rerun_done else [u for u in units if not output_done(Path(cfg.output_dir), u)]
    if not todo:
        print(f"servegen: every output is already done in {args.output_dir}; --rerun_done runs it again")
        return 0
    job = JobSpec(
        name=args.expname,
        commands=[_command(cfg, typed, unit) for unit in todo],
        env=cluster.env_vars,
        log_dir=Path(cfg.log_dir),
        nodes=cfg.server.nodes if cfg.server.address is None else 1,
        gpus_per_node=cfg.server.gpus if cfg.server.address is None else 0,
        partition=args.partition,
        time_limit_min=parse_time_limit(args.time_limit) if args.time_limit else None,
        time_min=args.time_min,
        resources=resources,
    )
    if not args.dry_run:
        job.dependencies += run_after_ids(args.run_after, cluster)
    chain = [job] + [_follow_up(job, i) for i in range(1, args.dependent_jobs + 1)]
    if args.dry_run:
        for i, link in enumerate(chain):
            if i:
                link.dependencies = ["<job id of the job above>"]
            print(slurm.sbatch_text(link, cluster))
        _print_server_launch(cfg, cluster, in_slurm=True, cpus_per_task=resources.cpus_per_task)
        return 0
    previous = None
    for link in chain:
        if previous is not None:
            link.dependencies = [previous]
        previous = slurm.submit(link, cluster).job_id
        kind = f"array of {len(link.commands)}" if len(link.commands) > 1 else "job"
        print(f"servegen: submitted {kind} {previous} ({cluster.job_name_prefix}{link.name}), logs in {link.log_dir}")
    return 0


def _print_server_launch(cfg: GenerationConfig, cluster: ClusterConfig, in_slurm: bool,
                         cpus_per_task: int | None = None) -> None:
    """How each job starts its own server (nothing with --server_address), as start_server's dry
    run shows it: the srun step, container and mount flags included."""
    if cfg.server.address is not None:
        return
    from servegen.cluster.launch import job_launch
    from servegen.server import build_server_command

    spec = co_located_spec(cfg.server, PORT_SHOWN)
    command = build_server_command(spec)
    launch = job_launch(spec, command, cluster, in_slurm, cpus_per_task)
    print(f"# each job starts its server with ({PORT_SHOWN} stands for the free port it picks):")
    print(launch.shell())
    print(head_ports_note(command), end="")


def _follow_up(job: JobSpec, i: int) -> JobSpec:
    from servegen.cluster.slurm import follow_up_name  # --run_after finds follow-ups by this name

    return JobSpec(**{**job.__dict__, "name": follow_up_name(job.name, i), "dependencies": []})


def _seeds(args, given: dict) -> list[int] | None:
    if "random_seeds" in given and args.num_random_seeds is not None:
        raise ServegenError("give --random_seeds or --num_random_seeds, not both")
    if args.starting_seed and args.num_random_seeds is None:
        raise ServegenError("--starting_seed is the first seed of --num_random_seeds; give that too")
    if args.num_random_seeds is not None:
        if args.num_random_seeds < 1:
            raise ServegenError(f"--num_random_seeds must be 1 or more, got {args.num_random_seeds}")
        return list(range(args.starting_seed, args.starting_seed + args.num_random_seeds))
    return given.get("random_seeds")


def _job_config(args, cluster: ClusterConfig, overrides: list[str]) -> GenerationConfig:
    """The job config: the flags given (each sets its key, FLAGS), then the ++overrides."""
    given = flag_values(args, tuple(FLAGS))
    if "server.address" in given:
        started_here = [setting_name(key) for key in ("server.gpus", "server.nodes", "server.args") if key in given]
        started_here += [flag for flag in ("--server_port", "--server_host") if getattr(args, flag[2:]) is not None]
        if started_here:
            raise ServegenError(f"{setting_name('server.address')} uses a running server; "
                                f"{started_here[0]} is for a server started here")
    elif not ("server.model" in given and "server.gpus" in given):
        raise ServegenError("give --model, --server_type and --server_gpus to start a server, or --server_address")
    elif args.server_port is not None or args.server_host is not None:
        raise ServegenError("the job's own server listens on a free port of 127.0.0.1; "
                            "--server_port and --server_host are for start_server")
    split_args(given.get("server.args", ""))  # a bad --server_args fails here, not in the job
    for key in ("input_file", "output_dir", "log_dir"):
        if key in given:
            given[key] = str(_abs(given[key]))
    given.setdefault("log_dir", str(Path(given["output_dir"]) / "logs"))
    given["cluster"] = str(cluster.path.resolve())
    given["random_seeds"] = _seeds(args, given)
    cfg = build_config(overrides, values=given)
    if not Path(cfg.input_file).is_file():
        raise ServegenError(f"--input_file {args.input_file} does not exist")
    return cfg


def _abs(path) -> Path:
    return Path(path).expanduser().resolve()


def _command(cfg: GenerationConfig, typed: set[str], unit: Unit | None = None) -> list[str]:
    """The job body's command line, with every ++key the user typed (`typed`); one unit (seed,
    chunk) per Slurm task, all of them locally."""
    if unit is not None:
        cfg = build_config([], base=cfg)
        cfg.random_seeds = None if unit.seed is None else [unit.seed]
        cfg.chunk_ids = None if unit.chunk is None else [unit.chunk]
    return [sys.executable, "-m", job_main.__module__, *to_overrides(cfg, keep=typed)]


if __name__ == "__main__":
    sys.exit(main())
