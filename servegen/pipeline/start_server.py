"""python -m servegen.pipeline.start_server: start a model server where the cluster config says,
wait until it is healthy, print its address.

On a local cluster the server runs in the foreground until Ctrl-C (or SIGTERM), which stops every
process it started. On a Slurm cluster it is submitted as a job: the command prints the job id,
waits for the server, prints its address, and stays until the job ends; Ctrl-C cancels the job.
"""

from servegen.cli import exit_on_signals, run_main

if __name__ == "__main__":
    exit_on_signals()  # a signal while the imports below run ends us at once: nothing has started yet

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from servegen.cluster.config import ClusterConfig, Resources, load_cluster_config
from servegen.cluster.jobs import JobSpec
from servegen.cluster.launch import job_launch, local_launch
from servegen.cluster.managed import ManagedServer
from servegen.errors import ServegenError, ServerError
from servegen.pipeline.common import (
    PORT_SHOWN,
    add_config_flags,
    add_resource_flags,
    add_run_after_flag,
    add_server_flags,
    head_ports_note,
    parse_time_limit,
    resources_from,
    run_after_ids,
    server_spec_from_flags,
)
from servegen.server import build_server_command
from servegen.server.command import DEFAULT_READY_TIMEOUT_S
from servegen.server.process import LOG_TAIL_LINES, free_port, log_tail, probe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="servegen start_server",
        description="Start a model server, wait until it is healthy and print its address.",
    )
    add_config_flags(parser, ("cluster", "config_dir"))
    add_server_flags(parser, starts_here=True)
    parser.add_argument(
        "--log_dir", default="servegen_logs", help="folder for the server (and job) logs (default: ./servegen_logs)"
    )
    parser.add_argument(
        "--ready_timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help=f"seconds to wait for the server to become healthy (default: {DEFAULT_READY_TIMEOUT_S})",
    )
    parser.add_argument("--partition", help="Slurm partition (default: the cluster config's)")
    parser.add_argument("--time_limit", help="Slurm job time limit, minutes or a Slurm time (default: the config's)")
    add_resource_flags(parser)
    parser.add_argument("--expname", default="server", help="Slurm job name after the config's prefix")
    add_run_after_flag(parser)
    parser.add_argument("--dry_run", action="store_true", help="print the exact command or sbatch script and exit")
    # what the submitted Slurm job runs: start the server in this allocation, write its address
    parser.add_argument("--run_here", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(_start, argv)


def _start(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cluster = load_cluster_config(args.cluster, args.config_dir)
    resources = resources_from(args, cluster)  # a local run refuses them before it starts
    if args.run_after and cluster.executor != "slurm":
        raise ServegenError("--run_after needs a Slurm cluster; locally commands run in order")
    if cluster.executor == "slurm" and not args.run_here:
        return _submit(args, cluster, resources)

    host = args.server_host or ("0.0.0.0" if args.run_here else "127.0.0.1")
    spec = server_spec_from_flags(args, host=host, port=args.server_port or free_port())
    command = build_server_command(spec)
    # local_launch also checks that the server can run on this machine
    launch = None if args.run_here and not args.dry_run else local_launch(spec, command, cluster)
    if args.dry_run:
        print(f"# {spec.server_type} server on cluster '{cluster.name}' (local): {spec.gpus} GPUs, port {spec.port}")
        print(launch.shell())
        print(head_ports_note(command), end="")
        print(f"# ready when {command.health_method} http://{_connect_host(host)}:{spec.port}{command.health_path}"
              " answers 200")
        return 0
    if args.server_port is not None:
        _check_port_free(host, spec.port)
    if not Path(spec.model).exists() and spec.model.startswith(("/", "./", "../", "~")):
        raise ServegenError(f"--model {spec.model}: no such file or folder")

    log_path = Path(args.log_dir) / f"{spec.server_type}-{spec.port}.log"
    # in a Slurm job: where the submitter, waiting for it, learns the address
    in_job = args.run_here and "SLURM_JOB_ID" in os.environ
    published = address_file(Path(args.log_dir), os.environ["SLURM_JOB_ID"]) if in_job else None
    server = ManagedServer(spec, cluster, lambda n: log_path, args.ready_timeout)
    try:
        server.start()
        address = f"http://{_public_host(host, args.run_here)}:{spec.port}"
        if published:
            tmp = published.with_name(published.name + ".tmp")
            tmp.write_text(address + "\n")
            tmp.replace(published)
        print(f"servegen: {spec.server_type} server ready at {address} (model {spec.model})", flush=True)
        print("servegen: press Ctrl-C to stop it", file=sys.stderr)
        code = server.process.proc.wait()
        raise ServerError(f"{spec.server_type} server exited with code {code}; see its log {log_path}")
    finally:
        if published:  # no stale address while a requeued job starts the server again
            published.unlink(missing_ok=True)
        server.stop()


def _submit(args: argparse.Namespace, cluster: ClusterConfig, resources: Resources) -> int:
    from servegen.cluster import slurm

    log_dir = Path(args.log_dir).resolve()
    # flag mistakes fail here, not in the job; the probe tells when the server answers
    spec = server_spec_from_flags(args, host=args.server_host or "0.0.0.0", port=args.server_port or PORT_SHOWN)
    server = build_server_command(spec)
    command = [
        sys.executable, "-m", "servegen.pipeline.start_server", "--run_here",
        "--cluster", str(cluster.path.resolve()), "--model", args.model, "--server_type", args.server_type,
        "--server_gpus", str(args.server_gpus), "--server_nodes", str(args.server_nodes),
        "--server_args", args.server_args, "--server_host", args.server_host or "0.0.0.0",
        "--log_dir", str(log_dir), "--ready_timeout", str(args.ready_timeout),
    ]
    if args.server_port:
        command += ["--server_port", str(args.server_port)]
    job = JobSpec(
        name=args.expname, commands=[command], env=cluster.env_vars, log_dir=log_dir, nodes=args.server_nodes,
        gpus_per_node=args.server_gpus, partition=args.partition,
        time_limit_min=parse_time_limit(args.time_limit) if args.time_limit else None,
        resources=resources,
    )
    if args.dry_run:
        print(slurm.sbatch_text(job, cluster), end="")
        note = "" if args.server_port else f" ({PORT_SHOWN} stands for the free port it picks)"
        print(f"# the job starts the server with{note}:")
        print(job_launch(spec, server, cluster, in_slurm=True, cpus_per_task=job.resources.cpus_per_task).shell())
        print(head_ports_note(server), end="")
        return 0
    job.dependencies += run_after_ids(args.run_after, cluster)
    submitted = slurm.submit(job, cluster)
    job_id = submitted.job_id
    print(f"servegen: submitted Slurm job {job_id}; waiting for the server (job log {submitted.log()})",
          file=sys.stderr, flush=True)
    path = address_file(log_dir, job_id)
    try:
        address = _wait_for_address(submitted, path, args.ready_timeout, server)
        print(f"servegen: {args.server_type} server ready at {address} (Slurm job {job_id})", flush=True)
        print(f"servegen: Ctrl-C (or scancel {job_id}) stops it", file=sys.stderr, flush=True)
        while (state := submitted.state()) in _LIVE_STATES:
            time.sleep(5)
            # a job requeued at its time limit (or preempted) starts the server again, maybe elsewhere
            moved = _answering_address(path, server)
            if moved and moved != address:
                address = moved
                print(f"servegen: {args.server_type} server ready at {address} (Slurm job {job_id}, requeued)",
                      flush=True)
        raise ServerError(f"Slurm job {job_id} ended ({state}); see {log_dir}")
    except KeyboardInterrupt:
        submitted.cancel()
        raise


# what squeue says of a job that may still run (a requeued job is PENDING again)
_LIVE_STATES = (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")


def address_file(log_dir: Path, job_id: str) -> Path:
    return log_dir / f"server-{job_id}.address"


def _answering_address(path: Path, server) -> str | None:
    """The address the job wrote, if its server answers there."""
    try:
        address = path.read_text().strip()
    except FileNotFoundError:
        return None
    if address and probe(address + server.health_path, server.health_method, server.health_body):
        return address
    return None


def _wait_for_address(job, path: Path, timeout_s: float, server) -> str:
    """The address the Slurm job's server answers at, once it does. The time limit counts from
    when the job runs: a queue (or a --run_after conversion) may take any time."""
    deadline = None
    pause = 1.0
    while deadline is None or time.monotonic() < deadline:
        address = _answering_address(path, server)
        if address:
            return address
        state = job.state()
        if state not in _LIVE_STATES:
            raise ServerError(f"Slurm job {job.job_id} ended ({state}) before its server was ready:\n"
                              f"{_job_error(job.log())}\n(the whole job log: {job.log()})")
        if deadline is None and state == "RUNNING":
            deadline = time.monotonic() + timeout_s
        time.sleep(pause if deadline is None else min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 1.5, 10.0)  # gentle on slurmctld while a big model loads
    job.cancel()
    raise ServerError(f"the server of Slurm job {job.job_id} was not ready after {timeout_s:.0f} s; job cancelled")


def _job_error(log: Path) -> str:
    """What the job said when it failed: its own `error:` message (with its server log's tail) up to
    submitit's report of it, else the end of the job log."""
    lines = log_tail(log, 400).rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if not starts:
        return "\n".join(lines[-LOG_TAIL_LINES:])
    end = next((j for j in range(starts[-1], len(lines)) if lines[j].startswith("submitit ")), len(lines))
    return "\n".join(lines[starts[-1]:end])


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _public_host(host: str, in_job: bool) -> str:
    """Where other machines reach the server: inside a Slurm job, the node's address."""
    if in_job and host in ("0.0.0.0", ""):
        from servegen.cluster.launch import head_node_address, in_slurm_job

        return head_node_address() if in_slurm_job() else socket.gethostname()
    return _connect_host(host)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind (uvicorn sets it): a port whose last connections linger in TIME_WAIT
        # is free for them, one that something listens on is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ServegenError(
                f"--server_port {port} is already in use on {host}; pick another or leave it out to get a free one"
            ) from None


if __name__ == "__main__":
    sys.exit(main())
