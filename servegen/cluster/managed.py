"""A model server that a job starts and keeps: started where the job runs
(`launch.start_server_here`), waited for, restarted when it dies (at most `max_restarts` times),
stopped. `start_server` (in its job, or here) and a generation job's co-located server are each
one."""

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from servegen.cluster.config import ClusterConfig
from servegen.errors import ServerError
from servegen.server.command import ServerSpec


class ManagedServer:
    def __init__(
        self,
        spec: ServerSpec,
        cluster: ClusterConfig,
        log_path: Callable[[int], Path],  # the log of the n-th start
        ready_timeout: float,
        max_restarts: int = 0,
        max_restarts_setting: str = "max_restarts",  # what the user sets it with, for the error
        new_port: bool = False,  # each start on a port free at that moment (else spec.port)
    ):
        self.spec, self.cluster, self.ready_timeout = spec, cluster, ready_timeout
        self._log_path, self.max_restarts, self._setting = log_path, max_restarts, max_restarts_setting
        self.new_port = new_port
        self.starts = 0
        self.process = None  # the ServerProcess of the current start
        self.log_path: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.spec.server_type} server"

    @property
    def port(self) -> int:
        return self.spec.port

    def start(self) -> None:
        """Start the server and wait until it answers its probe (ServerError if it does not)."""
        # imported here: a job that uses a running server never needs them, and start-up is part
        # of every job's wall time (benchmarks/README.md)
        from servegen.cluster import launch
        from servegen.server import process

        self.starts += 1
        if self.new_port:
            self.spec = replace(self.spec, port=process.free_port())
        self.log_path = self._log_path(self.starts)
        self.process = launch.start_server_here(self.spec, self.cluster, self.log_path, self.name)
        print(f"servegen: starting {self.name} (pid {self.process.pid}, log {self.log_path})", file=sys.stderr, flush=True)
        self.process.wait_ready(self.ready_timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def restart(self, why: str) -> None:
        """Start it again after `why` (it died, or hangs), unless it was restarted max_restarts times."""
        if self.starts > self.max_restarts:
            raise ServerError(
                f"{why} (log {self.log_path}); it was restarted {self.starts - 1} time(s) already, "
                f"as many as {self._setting} allows"
            )
        print(f"servegen: {why} (log {self.log_path}); restarting it", file=sys.stderr, flush=True)
        self.process.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
