"""SGLang's server (`python3 -m sglang.launch_server`).

Follows SGLang's server-arguments reference and multi-node deployment guide (docs.sglang.io,
python/sglang/srt/server_args.py, 2025-2026): tensor parallel over every GPU of every node
(--tp-size = GPUs x nodes); several nodes run the same command with --nnodes, their
--node-rank and --dist-init-addr pointing at the head node (its port one of head_ports). Readiness: /health_generate, which
answers 200 only once the server has generated a token (/health is the same handler in recent
releases, but only a liveness check in older ones).

GPU only. SGLang was NOT run here (no GPU on these machines): the command is golden-tested only.
"""

from servegen.errors import ServegenError
from servegen.server.command import MASTER_PORT, ServerCommand, ServerSpec, has_flag, join, parallel_sizes, with_defaults

DIST_INIT_PORT = 20000  # the port SGLang's multi-node guide uses on the head node
ENTRYPOINT = ["python3", "-m", "sglang.launch_server"]
TP_FLAGS = ("--tp-size", "--tp", "--tensor-parallel-size")
PP_FLAGS = ("--pp-size", "--pipeline-parallel-size")


def build_command(spec: ServerSpec) -> ServerCommand:
    if spec.gpus == 0:
        raise ServegenError("sglang needs GPUs (--server_gpus 1 or more); use --server_type vllm or hf on CPU")
    tp, pp = parallel_sizes(spec, TP_FLAGS, PP_FLAGS, default_pp=1)
    argv = [*ENTRYPOINT, "--model-path", spec.model, "--host", spec.host, "--port", str(spec.port)]
    if not has_flag(spec.args, *TP_FLAGS):
        argv += ["--tp-size", str(tp)]
    if pp > 1 and not has_flag(spec.args, *PP_FLAGS):
        argv += ["--pp-size", str(pp)]  # the user's --tp-size leaves GPUs for pipeline stages
    if spec.nodes > 1:
        argv += with_defaults(
            spec.args,
            [
                ("--nnodes", str(spec.nodes)),
                ("--node-rank", "$SERVEGEN_NODE_RANK"),
                # an IP, as SGLang's guide gives it (NodeAddr is often a hostname)
                ("--dist-init-addr", f"$SERVEGEN_HEAD_IP:${MASTER_PORT}"),
            ],
        )
    head_ports = {MASTER_PORT: DIST_INIT_PORT} if spec.nodes > 1 else {}
    return ServerCommand(script=join(argv + list(spec.args)), health_path="/health_generate", head_ports=head_ports)
