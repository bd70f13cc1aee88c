"""Shared test fixtures: golden files, the real vLLM CPU server (one per test session)."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def golden(request):
    """Compare text with tests/<layer>/golden/<name>. SERVEGEN_UPDATE_GOLDEN=1 rewrites a file that
    differs (or is missing) and fails the test all the same, so that a rewrite is never a pass:
    review the diff, then run again without it. Refused where CI is set."""
    folder = Path(request.path).parent / "golden"

    def check(name: str, text: str) -> None:
        path = folder / name
        old = path.read_text() if path.exists() else None
        if os.environ.get("SERVEGEN_UPDATE_GOLDEN") == "1" and old != text:
            if os.environ.get("CI"):
                pytest.fail("SERVEGEN_UPDATE_GOLDEN=1 is refused where CI is set: golden files are written by hand")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            pytest.fail(f"golden file {path} {'rewritten' if old is not None else 'written'}; review the diff, "
                        "then run again without SERVEGEN_UPDATE_GOLDEN")
        assert old is not None, f"golden file {path} is missing; run with SERVEGEN_UPDATE_GOLDEN=1 to create it"
        assert text == old, f"output differs from golden file {path}"

    return check


class RunningServer:
    """A real server started for the tests: where it listens and what it serves."""

    def __init__(self, host: str, port: int, model: str, model_path: Path, process):
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self.model = model  # the served model name
        self.model_path = model_path
        self.process = process


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """servegen's own demo model (built on first use, then taken from the cache)."""
    from servegen.demo_model import build_demo_model

    return build_demo_model()


@pytest.fixture(scope="session")
def vllm_server(demo_model, tmp_path_factory):
    """ONE real vLLM CPU server on the demo model for the whole test session (it takes ~1 min to start)."""
    from servegen.cluster.config import parse_cluster_config
    from servegen.cluster.launch import local_launch
    from servegen.server import build_server_command
    from servegen.server.command import ServerSpec
    from servegen.server.process import ServerProcess, free_port

    scratch = tmp_path_factory.mktemp("vllm")
    port = free_port()
    spec = ServerSpec(
        server_type="vllm",
        model=str(demo_model),
        gpus=0,
        port=port,
        args=("--max-model-len", "512"),
    )
    command = build_server_command(spec)
    cluster = parse_cluster_config({"executor": "local"}, Path("tests"))
    launch = local_launch(spec, command, cluster)
    env = launch.full_env()
    env["VLLM_CACHE_ROOT"] = str(scratch / "cache")  # keep ~/.cache/vllm clean
    env["TMPDIR"] = str(scratch)
    server = ServerProcess(launch.argv, env, scratch / "vllm.log", f"http://127.0.0.1:{port}/health", name="vllm")
    with server:
        server.wait_ready(timeout_s=900)
        yield RunningServer("127.0.0.1", port, str(demo_model), demo_model, server)
