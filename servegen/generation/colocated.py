"""The model server a generation job starts for itself, on its own node(s): the cluster layer's
managed server, each start on a free port, restarted when it dies or hangs (`watch`)."""

import asyncio
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from servegen.cluster.config import load_cluster_config
from servegen.cluster.managed import ManagedServer
from servegen.generation.config import GenerationConfig, ServerConfig, setting_name
from servegen.inference.transport import FastTransport, TransportError

# A co-located server is checked for life this often; its readiness probe is asked every
# hang_timeout / PROBES_PER_HANG_TIMEOUT s (at most every PROBE_EVERY_S), each answer awaited at most PROBE_TIMEOUT_S.
WATCH_INTERVAL_S = 0.5
PROBES_PER_HANG_TIMEOUT = 4
PROBE_EVERY_S = 10.0
PROBE_TIMEOUT_S = 5.0


class ServerDied(Exception):
    pass


def co_located_spec(server: ServerConfig, port: int):
    """The ServerSpec of the server a job starts for itself (cfg.server), listening on `port`."""
    from servegen.server.command import ServerSpec, split_args

    return ServerSpec(server_type=server.server_type, model=server.model, gpus=server.gpus, nodes=server.nodes,
                      port=port, args=split_args(server.args))


class CoLocatedServer(ManagedServer):
    """The model server this job starts on its own node(s) (cfg.server), each start on a free
    port, restarted (at most ++server.max_restarts times) when it dies or hangs (`watch`)."""

    def __init__(self, cfg: GenerationConfig, log_dir: Path):
        self.cfg = cfg.server
        super().__init__(
            # port 1: a placeholder (a spec needs a valid one); new_port gives each start a free port
            co_located_spec(self.cfg, 1), load_cluster_config(cfg.cluster, cfg.config_dir),
            lambda n: log_dir / f"{self.cfg.server_type}-server-{n}.log", self.cfg.ready_timeout,
            self.cfg.max_restarts, setting_name("server.max_restarts"), new_port=True,
        )

    def start(self) -> None:
        super().start()
        print(f"servegen: server ready at {self.address}", file=sys.stderr, flush=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def watch(self, answered_at: Callable[[], float], busy: Callable[[], bool], request_timeout: float) -> None:
        """Raise ServerDied when the server exits, or hangs (++server.hang_timeout = T): no sign of
        life for T s (its readiness probe answered 200, or a request finished: `answered_at()`,
        monotonic), or requests in flight (`busy()`) and none finished for max(T, request_timeout)
        s, as an engine stuck behind a live HTTP front end is (a long generation is no hang)."""
        hang = self.cfg.hang_timeout
        every = max(WATCH_INTERVAL_S, min(PROBE_EVERY_S, (hang or 0) / PROBES_PER_HANG_TIMEOUT))
        health = urllib.parse.urlsplit(self.process.health_url)
        transport = FastTransport(health.hostname, health.port, {})
        body = self.process.health_body.encode() if self.process.health_body is not None else None
        probed_ok = probed_at = time.monotonic()
        try:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                if not self.alive():
                    raise ServerDied(f"the server exited with code {self.process.proc.returncode}")
                if hang is None:
                    continue
                if time.monotonic() - probed_at >= every:
                    probed_at = time.monotonic()
                    try:
                        response = await transport.request(self.process.health_method, health.path, body,
                                                           min(PROBE_TIMEOUT_S, hang))
                        if response.status == 200:
                            probed_ok = time.monotonic()
                    except (TransportError, TimeoutError):
                        pass
                now = time.monotonic()
                if now - max(probed_ok, answered_at()) > hang:
                    raise ServerDied(f"the server hangs: it answered neither its readiness probe nor a request "
                                     f"for {hang:g} s ({setting_name('server.hang_timeout')})")
                stalled = max(hang, request_timeout)
                if busy() and now - answered_at() > stalled:
                    raise ServerDied(f"the server hangs: it finished none of the requests in flight for {stalled:g} s "
                                     f"({setting_name('server.hang_timeout')}, or the request timeout if longer)")
        finally:
            await transport.close()
