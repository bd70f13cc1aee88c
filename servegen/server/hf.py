"""Hugging Face transformers' own OpenAI-compatible server, `transformers serve` (transformers 5.x).

Follows `transformers serve --help` of transformers 5.19: the model preloaded (the FORCE_MODEL
argument), --host/--port, continuous batching (--continuous-batching: paged attention, requests
batched together; without it they run one at a time). --device is its device_map: cpu without
GPUs (float32: bf16 is slow on CPUs without native support), cuda for one GPU, auto for several,
which spreads the layers over every visible GPU (one at work at a time, no tensor parallelism).
One process on one node: several nodes are refused. Readiness: /health.

On CPU continuous batching sizes its KV cache as --cb-max-memory-percent of the machine's free
memory (0.9 unless set: 20.8 GB on these machines); 0.05 serves the demo model in a fraction of
that (docs/servers.md). Run here for real on CPU (tests/server/test_hf_real.py); the GPU
commands are golden-tested only.
"""

from servegen.errors import ServegenError
from servegen.server.command import ServerCommand, ServerSpec, has_flag, join, with_defaults

CB_FLAGS = ("--continuous-batching", "--no-continuous-batching")
CPU_CB_MEMORY = "0.05"


def build_command(spec: ServerSpec) -> ServerCommand:
    if spec.nodes > 1:
        raise ServegenError("hf (transformers serve) runs on one node; use --server_nodes 1")
    argv = ["transformers", "serve", spec.model, "--host", spec.host, "--port", str(spec.port)]
    if spec.gpus == 0:
        defaults = [("--device", "cpu"), ("--dtype", "float32")]
    else:
        defaults = [("--device", "cuda" if spec.gpus == 1 else "auto")]
    argv += with_defaults(spec.args, defaults)
    if not has_flag(spec.args, *CB_FLAGS):
        argv.append("--continuous-batching")
    if spec.gpus == 0 and not has_flag(spec.args, "--no-continuous-batching"):
        argv += with_defaults(spec.args, [("--cb-max-memory-percent", CPU_CB_MEMORY)])
    return ServerCommand(script=join(argv + list(spec.args)))
