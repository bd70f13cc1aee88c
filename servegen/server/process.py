"""A server process: started in its own process group with its own log file, waited on until it
answers its readiness probe (or dies, or runs past a deadline), and stopped with everything it
started."""

import collections
import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from servegen.errors import ServerError
from servegen.server.command import DEFAULT_READY_TIMEOUT_S

STOP_GRACE_S = 20.0
KILL_WAIT_S = 10.0  # a SIGKILLed process in uninterruptible I/O can take a moment to go
LOG_TAIL_LINES = 50


def die_with_parent(parent: int) -> None:
    """In a child just forked by process `parent` (its pid, read before the fork): SIGTERM when
    that process dies, even by kill -9, so that nothing we start outlives us. (Linux; it follows
    the thread that forked.) A parent that died before this call is SIGTERM at once."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports nobody listens on right now (each held until all are picked)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(collections.deque(f, maxlen=lines))
    except FileNotFoundError:
        return ""


def probe(url: str, method: str = "GET", body: str | None = None) -> bool:
    """Whether a server answers its readiness probe with 200 right now."""
    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """One launched server. Use as a context manager, or call start / wait_ready / stop."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        health_url: str,
        health_method: str = "GET",
        health_body: str | None = None,
        name: str = "server",
    ):
        self.argv = argv
        self.env = env
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.health_method = health_method
        self.health_body = health_body
        self.name = name
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A session of its own: one killpg reaches every process it starts, and Ctrl-C in our
            # terminal reaches only us, so that we stop it in order.
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, os.getpid()),
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def is_ready(self) -> bool:
        return probe(self.health_url, self.health_method, self.health_body)

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S, poll_s: float = 1.0) -> None:
        """Return when the server answers its probe; raise ServerError with the log's tail if it
        dies first or the deadline passes (then it is stopped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise ServerError(self._failure(f"exited with code {code} before it was ready"))
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(self._failure(f"was not ready after {timeout_s:.0f} s"))
            time.sleep(poll_s)

    def _failure(self, what: str) -> str:
        tail = log_tail(self.log_path).rstrip()
        return (
            f"{self.name} (pid {self.proc.pid}) {what}; last {LOG_TAIL_LINES} lines of {self.log_path}:\n{tail}"
        )

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the whole group (and any descendant that left it), SIGKILL after grace_s."""
        if self.proc is None:
            return
        procs = _tree(self.proc.pid)
        _signal_all(self.proc.pid, procs, signal.SIGTERM)
        _signal_all(self.proc.pid, procs, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        if not _gone_within(self.proc, procs, grace_s):
            procs = _tree(self.proc.pid) + procs
            _signal_all(self.proc.pid, procs, signal.SIGKILL)
            # SIGKILL is delivered asynchronously: return only once the whole tree is gone.
            _gone_within(self.proc, procs, KILL_WAIT_S)
        self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(pgid: int, procs: list[psutil.Process], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _gone_within(proc: subprocess.Popen, procs: list[psutil.Process], seconds: float) -> bool:
    """Waits up to `seconds` for every process to end; whether they all did."""
    deadline = time.monotonic() + seconds
    while _any_alive(proc, procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _any_alive(proc: subprocess.Popen, procs: list[psutil.Process]) -> bool:
    proc.poll()  # reap our direct child so it does not linger as a zombie
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            pass
    return False
