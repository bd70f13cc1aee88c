"""python -m servegen.pipeline.start_server: start a model server where the cluster config says,
wait until it is healthy, print its address.

On a local cluster the server runs in the foreground until Ctrl-C (or SIGTERM), which stops every
process it started. On a Slurm cluster it is submitted as a job (see servegen/cluster/slurm.py).
"""

import argparse
import socket
import sys
from pathlib import Path

from servegen.cluster.config import load_cluster_config
from servegen.cluster.launch import local_launch
from servegen.errors import ServegenError
from servegen.pipeline.common import add_server_flags, run_main, server_spec_from_flags, stop_on_signals
from servegen.server import build_server_command
from servegen.server.process import DEFAULT_READY_TIMEOUT_S, ServerProcess, free_port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="servegen start_server",
        description="Start a model server, wait until it is healthy and print its address.",
    )
    parser.add_argument("--cluster", default="local", help="cluster config name or path (default: local)")
    parser.add_argument("--config_dir", help="folder to look for cluster configs in first")
    add_server_flags(parser, required=True)
    parser.add_argument(
        "--log_dir", default="servegen_logs", help="folder for the server log (default: ./servegen_logs)"
    )
    parser.add_argument(
        "--ready_timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help=f"seconds to wait for the server to become healthy (default: {DEFAULT_READY_TIMEOUT_S})",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the exact command or script and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(_start, argv)


def _start(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cluster = load_cluster_config(args.cluster, args.config_dir)
    if cluster.executor == "slurm":
        from servegen.cluster.slurm import start_server_on_slurm

        return start_server_on_slurm(args, cluster)

    host = args.server_host or "127.0.0.1"
    spec = server_spec_from_flags(args, host=host, port=args.server_port or free_port(host))
    port = spec.port
    if args.server_port is not None and not args.dry_run:
        _check_port_free(host, port)
    command = build_server_command(spec)
    launch = local_launch(spec, command, cluster)
    health_url = f"http://{_connect_host(host)}:{port}{command.health_path}"

    if args.dry_run:
        print(f"# {spec.server_type} server on cluster '{cluster.name}' (local): {spec.gpus} GPUs, port {port}")
        print(launch.shell())
        print(f"# ready when {command.health_method} {health_url} answers 200")
        return 0

    if not Path(spec.model).exists() and spec.model.startswith(("/", "./", "../", "~")):
        raise ServegenError(f"--model {spec.model}: no such file or folder")
    log_path = Path(args.log_dir) / f"{spec.server_type}-{port}.log"
    server = ServerProcess(
        launch.argv,
        launch.full_env(),
        log_path,
        health_url,
        health_method=command.health_method,
        health_body=command.health_body,
        name=f"{spec.server_type} server",
    )
    with stop_on_signals():
        with server:
            print(f"servegen: starting {spec.server_type} server (pid {server.pid}, log {log_path})", file=sys.stderr)
            server.wait_ready(args.ready_timeout)
            address = f"http://{_connect_host(host)}:{port}"
            print(f"servegen: {spec.server_type} server ready at {address} (model {spec.model})", flush=True)
            print("servegen: press Ctrl-C to stop it", file=sys.stderr)
            code = server.proc.wait()
            raise ServegenError(f"{spec.server_type} server exited with code {code}; see its log {log_path}")


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise ServegenError(
                f"--server_port {port} is already in use on {host}; pick another or leave it out to get a free one"
            ) from None


if __name__ == "__main__":
    sys.exit(main())
