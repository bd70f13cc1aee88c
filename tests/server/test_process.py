"""The launcher with real processes: readiness, death before readiness, deadlines, teardown of
whole process trees, free ports."""

import os
import signal
import socket
import sys
import textwrap
import time

import psutil
import pytest

from servegen.errors import ServerError
from servegen.server.process import ServerProcess, free_port

# A tiny HTTP server that answers /health only after a delay, started as a child of a shell
# that also leaves a grandchild behind: the teardown must reach both.
SLOW_SERVER = textwrap.dedent(
    """
    import http.server, sys, time
    ready_at = time.time() + float(sys.argv[2])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if time.time() > ready_at else 503)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("listening", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_children(pid: int, name: str, timeout_s: float = 30) -> list[int]:
    """The pids under `pid` once a process called `name` is among them (busy machines are slow)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children(recursive=True)
        if any(c.name() == name for c in children):
            return [c.pid for c in children]
        time.sleep(0.05)
    raise AssertionError(f"no {name} under pid {pid} after {timeout_s} s")


def make_server(tmp_path, script: str, port: int, **kw) -> ServerProcess:
    (tmp_path / "server.py").write_text(SLOW_SERVER)
    return ServerProcess(
        ["bash", "-c", script], dict(os.environ), tmp_path / "logs" / "server.log",
        f"http://127.0.0.1:{port}/health", **kw,
    )


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ready_then_stop_takes_the_whole_tree(tmp_path):
    port = free_port()
    script = f"sleep 1000 & {sys.executable} {tmp_path}/server.py {port} 1.5"
    server = make_server(tmp_path, script, port)
    with server:
        started = time.monotonic()
        server.wait_ready(timeout_s=60, poll_s=0.2)
        assert time.monotonic() - started >= 1.4  # 503s before were not taken for readiness
        tree = [server.pid] + [c.pid for c in psutil.Process(server.pid).children(recursive=True)]
        assert len(tree) >= 3  # bash, sleep, python
    assert not any(alive(pid) for pid in tree)
    assert "listening" in (tmp_path / "logs" / "server.log").read_text()


def test_death_before_ready_reports_log_tail(tmp_path):
    script = "for i in $(seq 1 80); do echo line $i; done; echo 'CUDA out of memory' >&2; exit 3"
    server = make_server(tmp_path, script, free_port())
    server.start()
    started = time.monotonic()
    with pytest.raises(ServerError) as e:
        server.wait_ready(timeout_s=600, poll_s=0.1)
    assert time.monotonic() - started < 10
    message = str(e.value)
    assert "exited with code 3 before it was ready" in message
    assert "CUDA out of memory" in message and "line 80" in message
    assert "line 31\n" not in message  # only the last 50 lines: 32..80 and the error
    assert "line 32\n" in message


def test_deadline_stops_the_server(tmp_path):
    port = free_port()
    server = make_server(tmp_path, f"exec {sys.executable} {tmp_path}/server.py {port} 1000", port)
    server.start()
    pid = server.pid
    with pytest.raises(ServerError, match="was not ready after 2 s"):
        server.wait_ready(timeout_s=2, poll_s=0.2)
    assert not alive(pid)


def test_sigterm_ignored_then_sigkill(tmp_path):
    server = make_server(tmp_path, "trap '' TERM; sleep 1000 & wait; wait", free_port())
    server.start()
    children = wait_for_children(server.pid, "sleep")
    started = time.monotonic()
    server.stop(grace_s=1.0)
    assert 0.9 <= time.monotonic() - started < 10
    assert not alive(server.pid) and not any(alive(c) for c in children)


def test_descendant_in_its_own_session_is_stopped_too(tmp_path):
    server = make_server(tmp_path, "setsid sleep 1000 & wait", free_port())
    server.start()
    children = wait_for_children(server.pid, "sleep")
    assert any(os.getsid(c) != os.getsid(server.pid) for c in children)
    server.stop(grace_s=2.0)
    assert not any(alive(c) for c in children)


def test_stop_before_start_and_twice(tmp_path):
    server = make_server(tmp_path, "sleep 1000", free_port())
    server.stop()
    server.start()
    server.stop()
    server.stop()
    assert server.proc.returncode == -signal.SIGTERM


def test_server_dies_with_its_owner_even_on_kill_9(tmp_path):
    port = free_port()
    (tmp_path / "server.py").write_text(SLOW_SERVER)
    owner_code = textwrap.dedent(
        f"""
        import os, sys, time
        from servegen.server.process import ServerProcess
        s = ServerProcess([sys.executable, "{tmp_path}/server.py", "{port}", "0"], dict(os.environ),
                          "{tmp_path}/owner.log", "http://127.0.0.1:{port}/health").start()
        s.wait_ready(60, 0.1)
        print(s.pid, flush=True)
        time.sleep(1000)
        """
    )
    import subprocess

    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    server_pid = int(owner.stdout.readline())
    assert alive(server_pid)
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(server_pid):
        time.sleep(0.1)
    assert not alive(server_pid)
