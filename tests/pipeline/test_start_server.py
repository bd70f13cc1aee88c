"""start_server on the local cluster: the dry-run commands, one-line errors, and the real vLLM
CPU server started, asked, and stopped with Ctrl-C leaving nothing behind."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from asking import ask_two_plus_two
from processes import as_a_shell_starts
from servegen.server import SERVER_TYPES

ENGINE_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP", "VLLM_TARGET_DEVICE", "SERVEGEN_CONFIG_DIR")


def start_server(*args, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV}
    return subprocess.run(
        [sys.executable, "-m", "servegen.pipeline.start_server", *args],
        capture_output=True, text=True, timeout=120, env=env, **kw,
    )


@pytest.mark.parametrize("server_type", SERVER_TYPES)
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_dry_run_local(server_type, gpus, golden, tmp_path):
    result = start_server(
        "--cluster", "local", "--model", "/models/llama", "--server_type", server_type,
        "--server_gpus", str(gpus), "--server_port", "5000", "--dry_run", cwd=tmp_path,
    )
    text = result.stdout if result.returncode == 0 else f"exit {result.returncode}\n{result.stderr}"
    golden(f"local-{server_type}-{gpus}g.txt", text)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--server_gpus", "-1"], "error: --server_gpus must be 0 or more, got -1\n"),
        (["--server_gpus", "1", "--server_nodes", "2"],
         "error: cluster 'local' runs on this one machine; --server_nodes 2 needs a Slurm cluster\n"),
        (["--server_gpus", "0", "--cluster", "nowhere"], "error: cluster config 'nowhere' not found"),
        (["--server_gpus", "0", "--server_args", "--port 7"],
         "error: --server_args must not set the port; use --server_port\n"),
        (["--server_gpus", "0", "--server_args", "--dtype 'half"], "error: --server_args cannot be parsed"),
        (["--server_gpus", "0", "--server_port", "70000"], "error: --server_port must be between 1 and 65535"),
    ],
)
def test_bad_flags_give_one_line(args, message, tmp_path):
    result = start_server("--model", "/models/llama", "--server_type", "vllm", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_missing_model_folder(tmp_path):
    result = start_server("--model", "/no/such/model", "--server_type", "vllm", "--server_gpus", "0", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: --model /no/such/model: no such file or folder\n")


def test_port_in_use(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = start_server(
            "--model", "/m", "--server_type", "vllm", "--server_gpus", "0", "--server_port", str(port), cwd=tmp_path
        )
    assert result.returncode == 2
    assert f"--server_port {port} is already in use" in result.stderr


def test_a_port_whose_last_connection_waits_in_time_wait_is_free(tmp_path):
    """As after a server on --server_port 5000 stops: its side of each connection it closed
    lingers in TIME_WAIT for a minute, and a new server binds the port all the same."""
    import socket

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server's side closes first: it is the one in TIME_WAIT
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the TIME_WAIT is there: a bind without SO_REUSEADDR fails
    result = start_server("--model", "/no/such/model", "--server_type", "vllm", "--server_gpus", "0",
                          "--server_port", str(port), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: --model /no/such/model: no such file or folder\n")


def test_unknown_server_type_is_an_argparse_error(tmp_path):
    result = start_server("--model", "/m", "--server_type", "tgi", "--server_gpus", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --server_type: invalid choice: 'tgi'" in result.stderr


def read_ready_line(proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready at" in line:
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"start_server exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError("no ready line")


def test_real_vllm_server_answers_and_ctrl_c_leaves_nothing(demo_model, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", "local",
         "--model", str(demo_model), "--server_type", "vllm", "--server_gpus", "0",
         "--log_dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")}, preexec_fn=as_a_shell_starts,
    )
    try:
        line = read_ready_line(proc, timeout_s=600)
        address = line.split("ready at ")[1].split()[0]
        assert address.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(address + "/health", timeout=10) as r:
            assert r.status == 200
        assert ask_two_plus_two(address, str(demo_model)) == "2 + 2 = 4."
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3  # start_server, the API server, its engine core
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        gone_by = time.monotonic() + 10
        while time.monotonic() < gone_by and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                                 for p in tree):
            time.sleep(0.2)
        assert [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"] == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_server_killed_while_waiting_is_reported_with_its_log(demo_model, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--model", str(demo_model),
         "--server_type", "vllm", "--server_gpus", "0", "--log_dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not psutil.Process(proc.pid).children():
            time.sleep(0.1)
        server = psutil.Process(proc.pid).children()[0]
        # let it write a few log lines, then kill it long before it could be ready
        log = tmp_path / "logs"
        while time.monotonic() < deadline and not any(f.stat().st_size for f in log.glob("*.log")):
            time.sleep(0.2)
        server.kill()
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - started < 30
        assert proc.returncode == 2
        assert "error: vllm server" in stderr and "exited with code -9 before it was ready" in stderr
        assert "last 50 lines of" in stderr
        assert len(stderr.split("last 50 lines of", 1)[1].strip().splitlines()) >= 2  # the log's own lines
    finally:
        if proc.poll() is None:
            proc.kill()
