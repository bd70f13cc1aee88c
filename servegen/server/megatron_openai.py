"""Megatron-LM's OpenAI-compatible server, examples/inference/launch_inference_server.py: what
Megatron-LM's README now recommends (added in May 2026, Megatron-LM PR #4697), MegatronAsyncLLM.serve
on the dynamic inference engine. POST /v1/completions and /v1/chat/completions, GET /health; no
/v1/models (see servegen/inference/openai_compat.py for what the client sends).

Launched as the legacy server is (nemo.py, megatron_torchrun): torchrun starts one process per GPU
and joins the nodes, so one task per node, the master port one of head_ports; the HTTP frontend
runs on global rank 0, the head node. Megatron-LM's own example (run_inference_server.sh) runs
`-m examples.inference.launch_inference_server` from the repository root; the script puts that
root on sys.path itself, so servegen runs it by path under $SERVEGEN_MEGATRON_DIR. Its own flags
--host and --port (default 0.0.0.0:5000) get --server_host and --server_port; its coordinator binds
a free port of its own unless --coordinator-port is given, so it needs no head port. Readiness:
GET /health, 200 once the inference client is up (503 before).

GPU only. NOT run here (no GPU on these machines): golden-tested only.
"""

from servegen.server.command import MASTER_PORT, ServerCommand, ServerSpec, join, require_file, with_defaults
from servegen.server.nemo import MEGATRON_ENV, MEGATRON_MASTER_PORT, megatron_torchrun

SCRIPT = '"$SERVEGEN_MEGATRON_DIR"/examples/inference/launch_inference_server.py'
MISSING = (
    "$SERVEGEN_MEGATRON_DIR/examples/inference/launch_inference_server.py is not in this environment: "
    "Megatron-LM has this OpenAI-compatible server only since May 2026 (its PR #4697), so older checkouts and images "
    "lack it (--server_type megatron serves those); set SERVEGEN_MEGATRON_DIR to a newer Megatron-LM checkout "
    "(or use an image, containers.megatron_openai, that has it at /opt/Megatron-LM)"
)


def build_command(spec: ServerSpec) -> ServerCommand:
    argv = megatron_torchrun(spec, SCRIPT)
    argv += with_defaults(spec.args, [("--host", spec.host), ("--port", str(spec.port))])
    return ServerCommand(
        script=require_file(SCRIPT, MISSING) + join(argv + list(spec.args)),
        env=dict(MEGATRON_ENV),
        head_ports={MASTER_PORT: MEGATRON_MASTER_PORT},
        health_path="/health",
    )
