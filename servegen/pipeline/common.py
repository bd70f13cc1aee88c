"""What the command-line entry points share: server flags and their checks, time limits."""

import argparse

from servegen.cluster.config import parse_slurm_time
from servegen.errors import ServegenError
from servegen.server import SERVER_TYPES
from servegen.server.command import ServerSpec, split_args


def add_server_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, help="model folder (or name the engine understands)")
    parser.add_argument("--server_type", required=required, choices=SERVER_TYPES, help="inference engine")
    parser.add_argument(
        "--server_gpus", type=int, required=required, help="GPUs per node the server uses (0: CPU, vllm and hf only)"
    )
    parser.add_argument("--server_nodes", type=int, default=1, help="nodes the server spans (default: 1)")
    parser.add_argument("--server_args", default="", help="extra engine flags, appended last so they win")
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
