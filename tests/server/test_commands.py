"""Every engine's command, checked three ways: against golden files (read against each engine's
documentation; see docs/servers.md), by bash itself (syntax, and the argv an engine would receive
when the script runs with stub executables), and for the errors and overrides users meet."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from servegen.errors import ServegenError
from servegen.server import SERVER_TYPES, build_server_command
from servegen.server.command import ServerSpec

MODEL = "/models/llama"  # no such folder here, so nothing depends on this machine
SHAPES = [(1, 1), (1, 8), (2, 1), (2, 8), (1, 0)]  # (nodes, GPUs per node); 0 GPUs = CPU
ENGINE_EXECUTABLES = ("python3", "ray", "vllm", "transformers", "trtllm-serve", "trtllm-llmapi-launch", "torchrun")
ODD_MODEL = """/models/my "odd" model's dir $HOME;`x`"""
ODD_ARG = "a b'c \"d\" $HOME"
NEMO_SCRIPT = "NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py"
MEGATRON_SCRIPT = "Megatron-LM/tools/run_text_generation_server.py"
MEGATRON_OPENAI_SCRIPT = "Megatron-LM/examples/inference/launch_inference_server.py"


def spec(server_type: str, nodes: int = 1, gpus: int = 1, model: str = MODEL, args: tuple[str, ...] = ()) -> ServerSpec:
    return ServerSpec(server_type=server_type, model=model, gpus=gpus, nodes=nodes, args=args)


def render(s: ServerSpec) -> str:
    """A ServerCommand as a reviewer reads it; an impossible request as its error line."""
    head = f"# {s.server_type}: {s.nodes} node(s) x {s.gpus} GPU(s), model {s.model}, {s.host}:{s.port}\n"
    try:
        c = build_server_command(s)
    except ServegenError as e:
        return head + f"error: {e}\n"
    env = "".join(f"  {k}={v}\n" for k, v in c.env.items()) or "  (none)\n"
    return (
        head
        + f"tasks_per_node: {c.tasks_per_node}" + (" (MPI ranks)" if c.mpi else "") + "\n"
        + f"probe: {c.health_method} {c.health_path}"
        + (f" {c.health_body}" if c.health_body is not None else "")
        + "".join(f"\nhead port {k} (default {v})" for k, v in c.head_ports.items())
        + f"\nenv:\n{env}script:\n{c.script}\n"
    )


@pytest.mark.parametrize("server_type", SERVER_TYPES)
@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_golden(golden, server_type, nodes, gpus):
    golden(f"{server_type}-{nodes}n-{gpus}g.txt", render(spec(server_type, nodes, gpus)))


def test_golden_files_are_all_in_use():
    wanted = {f"{t}-{n}n-{g}g.txt" for t in SERVER_TYPES for n, g in SHAPES}
    present = {p.name for p in (Path(__file__).parent / "golden").glob("*.txt")}
    assert present == wanted


def valid_specs(**kw) -> list[ServerSpec]:
    out = []
    for t in SERVER_TYPES:
        for n, g in SHAPES:
            s = spec(t, n, g, **kw)
            try:
                build_server_command(s)
            except ServegenError:
                continue
            out.append(s)
    return out


def test_every_engine_has_valid_shapes():
    specs = valid_specs()
    assert {s.server_type for s in specs} == set(SERVER_TYPES)
    assert sum(s.nodes > 1 for s in specs) == 6 * 2  # all but hf run on 2 nodes, with 1 and 8 GPUs


@pytest.mark.parametrize("s", valid_specs(), ids=lambda s: f"{s.server_type}-{s.nodes}n-{s.gpus}g")
def test_script_is_valid_bash(s):
    script = build_server_command(s).script
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- running the scripts with stub engines: what argv each engine really gets ---

STUB = """#!/bin/bash
line=${0##*/}; for a in "$@"; do line+=$'\\x1f'"$a"; done; printf '%s\\n' "$line" >> "$STUB_LOG"  # one write
"""
# the stub, failing its first $FAIL_FIRST calls
FAILING_STUB = STUB + """n=$(grep -c "^${0##*/}" "$STUB_LOG")
[ "$n" -gt "$FAIL_FIRST" ]
"""
# `ray start --head --block &` stays up a while, out of the test's pipes (unless RAY_HEAD_EXITS)
RAY_STUB = STUB + """case " $* " in *" --head "*) [ -n "$RAY_HEAD_EXITS" ] && exit 1; exec >/dev/null 2>&1; /bin/sleep 5;; esac
"""


@pytest.fixture
def run_script(tmp_path):
    """Run a ServerCommand's script as node `rank` would, with every engine executable replaced by
    a stub that logs its argv; returns the logged calls, each a list [name, *args]."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ENGINE_EXECUTABLES:
        (bin_dir / name).write_text(RAY_STUB if name == "ray" else STUB)
        (bin_dir / name).chmod(0o755)

    # NVIDIA's images keep NeMo and Megatron-LM in /opt; here, scripts of the same names under tmp
    for folder in ("opt", "src"):
        for script in (NEMO_SCRIPT, MEGATRON_SCRIPT, MEGATRON_OPENAI_SCRIPT):
            (tmp_path / folder / script).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / script).write_text("")

    def run(s: ServerSpec, rank: int = 0, **extra_env: str) -> list[list[str]]:
        command = build_server_command(s)
        log = tmp_path / f"calls-{rank}.log"
        log.unlink(missing_ok=True)
        env = {
            **command.env,
            "SERVEGEN_NEMO_DIR": str(tmp_path / "opt" / "NeMo"),
            "SERVEGEN_MEGATRON_DIR": str(tmp_path / "opt" / "Megatron-LM"),
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": "/home/nobody",
            "STUB_LOG": str(log),
            "SERVEGEN_NODE_RANK": str(rank),
            "SERVEGEN_NUM_NODES": str(s.nodes),
            "SERVEGEN_HEAD_HOST": "head-node",
            "SERVEGEN_HEAD_IP": "10.0.0.1",
            "SERVEGEN_NODE_IP": f"10.0.0.{rank + 1}",
            **head_ports(command),
            **extra_env,
        }
        result = subprocess.run(["bash", "-c", command.script], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return [line.split("\x1f") for line in log.read_text().splitlines()]

    return run


def head_ports(command) -> dict[str, str]:
    """The command's head ports as a job would give them: here 40000, 40001, ... (never an
    engine's default)."""
    return {name: str(40000 + i) for i, name in enumerate(command.head_ports)}


def engine_call(calls: list[list[str]]) -> list[str]:
    """The last call: the engine's own (vLLM's head runs `ray start` in the background, whose
    line may come at any time, and a wait loop first)."""
    calls = [c for c in calls if c[:3] != ["ray", "start", "--head"]]
    assert calls, "the script ran no engine"
    return calls[-1]


@pytest.mark.parametrize(
    "s",
    [s for s in valid_specs(model=ODD_MODEL) if not (s.server_type == "trtllm" and s.gpus * s.nodes > 1)],
    ids=lambda s: f"{s.server_type}-{s.nodes}n-{s.gpus}g",
)
def test_odd_model_path_and_user_args_reach_the_engine_intact(run_script, s):
    extra = ("+servegen_note=x",) if s.server_type == "nemo" else ("--servegen-note",)
    s = ServerSpec(s.server_type, s.model, s.gpus, s.nodes, args=(*extra, ODD_ARG))
    ranks = [0] if s.server_type == "vllm" else range(s.nodes)  # vLLM's other nodes only join Ray
    for rank in ranks:
        argv = engine_call(run_script(s, rank))
        assert argv[-2:] == [*extra[-1:], ODD_ARG]  # user args come last, untouched
        if s.server_type == "nemo":
            value = next(a for a in argv if a.startswith("gpt_model_file="))
            assert OverridesParser.create().parse_override(value).value() == ODD_MODEL
        else:
            assert ODD_MODEL in argv


def test_sglang_nodes_join_the_head(run_script):
    for rank in (0, 1):
        argv = engine_call(run_script(spec("sglang", 2, 8), rank))
        assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--dist-init-addr") + 1] == "10.0.0.1:40000"  # the job's port, not 20000
        assert argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--tp-size") + 1] == "16"


@pytest.mark.parametrize("server_type, script", [("megatron", MEGATRON_SCRIPT), ("megatron_openai", MEGATRON_OPENAI_SCRIPT)])
def test_megatron_torchrun_joins_the_head_and_finds_the_script(run_script, tmp_path, server_type, script):
    for rank in (0, 1):
        argv = engine_call(run_script(spec(server_type, 2, 8), rank))
        assert argv[0] == "torchrun"
        assert argv[argv.index("--node_rank") + 1] == str(rank)
        assert argv[argv.index("--master_addr") + 1] == "head-node"
        assert argv[argv.index("--master_port") + 1] == "40000"  # the job's port, not 6000
        assert argv[argv.index("--master_port") + 2] == str(tmp_path / "opt" / script)  # torchrun's own flags end here
        assert argv[argv.index("--tensor-model-parallel-size") + 1] == "8"
        assert argv[argv.index("--pipeline-model-parallel-size") + 1] == "2"


def test_megatron_openai_listens_where_it_is_told(run_script):
    argv = engine_call(run_script(ServerSpec("megatron_openai", MODEL, 8, host="0.0.0.0", port=8123)))
    assert argv[-4:] == ["--host", "0.0.0.0", "--port", "8123"]  # its defaults are 0.0.0.0:5000
    c = build_server_command(spec("megatron_openai"))
    assert (c.health_method, c.health_path, c.health_body, c.tasks_per_node) == ("GET", "/health", None, 1)


def test_an_older_megatron_lm_without_the_openai_server_fails_the_task_with_one_line(run_script, tmp_path):
    """A checkout from before May 2026 has the legacy server but not launch_inference_server.py."""
    (tmp_path / "opt" / MEGATRON_OPENAI_SCRIPT).unlink()
    assert engine_call(run_script(spec("megatron")))[0] == "torchrun"
    with pytest.raises(AssertionError) as e:
        run_script(spec("megatron_openai"))
    lines = [line for line in str(e.value).splitlines() if line.startswith("servegen: ")]
    assert len(lines) == 1 and "launch_inference_server.py is not in this environment" in lines[0]
    assert "older checkouts and images lack it (--server_type megatron serves those)" in lines[0]


def test_nemo_finds_its_script(run_script, tmp_path):
    argv = engine_call(run_script(spec("nemo", 2, 8), 1))
    assert argv[:2] == ["python3", str(tmp_path / "opt" / NEMO_SCRIPT)]


@pytest.mark.parametrize("server_type, missing", [
    ("nemo", "megatron_gpt_eval.py is not in this environment: NeMo's text generation server exists only in NeMo images"),
    ("megatron", "tools/run_text_generation_server.py is not in this environment; set SERVEGEN_MEGATRON_DIR"),
    ("megatron_openai", "examples/inference/launch_inference_server.py is not in this environment: Megatron-LM has this"),
])
def test_a_missing_server_script_fails_the_task_with_one_line(run_script, tmp_path, server_type, missing):
    """A NeMo image without the NLP collection (removed from NeMo in 2026), or a Megatron-LM not
    where it is looked for: one line saying so, not Python's 'can't open file'."""
    with pytest.raises(AssertionError) as e:
        run_script(spec(server_type, 1, 8), SERVEGEN_NEMO_DIR="/nowhere", SERVEGEN_MEGATRON_DIR="/nowhere")
    lines = [line for line in str(e.value).splitlines() if line.startswith("servegen: ")]
    assert len(lines) == 1 and missing in lines[0] and "/nowhere/" in lines[0]


RAY_NODE = ["--num-gpus=8", "--min-worker-port=0", "--max-worker-port=0", "--dashboard-agent-listen-port=0",
            "--disable-usage-stats", "--block"]
LISTENS = "import socket, sys; host, _, port"  # the check that the head's Ray listens


def test_vllm_head_and_worker(run_script):
    head = run_script(spec("vllm", 2, 8), 0)
    ray = [c for c in head if c[0] == "ray"]  # (in the background: its line may come later)
    assert ray == [["ray", "start", "--head", "--port=40000", "--ray-client-server-port=40001",
                    "--dashboard-port=40002", "--node-ip-address=10.0.0.1", *RAY_NODE]]
    # it waits until the head listens and both nodes are alive in this job's Ray, then vLLM joins it
    checks = [c for c in head if c[0] == "python3"]
    assert [c[:2] for c in checks] == [["python3", "-c"]] * 2 and checks[0][2].startswith(LISTENS)
    assert checks[0][3] == checks[1][3] == "10.0.0.1:40000" and "ray.init(address=sys.argv[1]" in checks[1][2]
    assert [c for c in head if c[0] not in ("ray", "python3")] == [engine_call(head)]
    assert engine_call(head)[:3] == ["vllm", "serve", MODEL]
    worker = run_script(spec("vllm", 2, 8), 1)
    assert worker[0][:3] == ["python3", "-c", worker[0][2]] and worker[0][2].startswith(LISTENS)
    assert worker[1:] == [["ray", "start", "--address=10.0.0.1:40000", "--node-ip-address=10.0.0.2", *RAY_NODE]]
    assert build_server_command(spec("vllm", 1, 0)).script.startswith("python3 -m vllm.entrypoints.openai.api_server ")


def test_vllm_head_gives_up_at_once_when_its_ray_exits(run_script, tmp_path):
    """A head whose Ray exits (a port taken, say) is not waited for 300 s."""
    bin_dir = tmp_path / "bin"
    for name in ("python3", "sleep"):  # nodes never join; `sleep` takes no time
        (bin_dir / name).write_text(FAILING_STUB if name == "python3" else STUB)
    with pytest.raises(AssertionError) as e:
        run_script(spec("vllm", 2, 8), 0, RAY_HEAD_EXITS="1", FAIL_FIRST="99")
    assert "servegen: the head's Ray exited (its output is above)" in str(e.value)
    assert "within 300 s" not in str(e.value)
    calls = [line.split("\x1f")[0] for line in (tmp_path / "calls-0.log").read_text().splitlines()]
    assert calls.count("sleep") < 10 and "vllm" not in calls


def test_every_ray_start_parses_with_rays_own_parser(run_script):
    """`ray start` as Ray's own click command reads it (Ray installed here): a misspelt or
    removed flag fails; the ports are the job's, the node's own left to its OS."""
    from ray.scripts.scripts import start

    def parsed(call: list[str]) -> dict:
        assert call[:2] == ["ray", "start"]
        return start.make_context("start", call[2:]).params

    head, worker = (parsed(next(c for c in run_script(spec("vllm", 2, 8), rank) if c[0] == "ray")) for rank in (0, 1))
    assert (head["head"], head["port"], head["ray_client_server_port"], head["dashboard_port"]) == (True, 40000, 40001, 40002)
    assert (worker["head"], worker["address"]) == (False, "10.0.0.1:40000")
    for node, ip in ((head, "10.0.0.1"), (worker, "10.0.0.2")):
        assert (node["node_ip_address"], node["num_gpus"], node["block"]) == (ip, 8, True)
        assert (node["min_worker_port"], node["max_worker_port"], node["dashboard_agent_listen_port"]) == (0, 0, 0)
    with pytest.raises(Exception, match="No such option"):
        start.make_context("start", ["--head", "--dashbord-port=1"])




@pytest.mark.parametrize("rank, fail_first, joined", [(1, 3, True), (1, 99, False), (0, 4, True), (0, 99, False)])
def test_vllm_nodes_retry_joining_for_300_s_then_fail_in_one_line(run_script, tmp_path, rank, fail_first, joined):
    """A worker whose `ray start` fails while the head's Ray is not up yet retries every 5 s; the
    head's check that every node joined likewise; both give up after 60 tries (300 s) with one
    line. (`sleep` is a stub here: no test waits 5 s.)"""
    failing = "ray" if rank else "python3"
    bin_dir = tmp_path / "bin"
    for name in (failing, "sleep"):
        (bin_dir / name).write_text(FAILING_STUB if name == failing else STUB)
        (bin_dir / name).chmod(0o755)
    if not joined:
        with pytest.raises(AssertionError, match="within 300 s"):
            run_script(spec("vllm", 2, 8), rank, FAIL_FIRST=str(fail_first))
        return
    calls = run_script(spec("vllm", 2, 8), rank, FAIL_FIRST=str(fail_first))
    # the head's check: a try that gets through runs two (does the head listen, are both alive)
    assert [c[0] for c in calls].count(failing) == fail_first + 1 + (rank == 0)
    assert [c for c in calls if c[0] == "sleep"] == [["sleep", "5"]] * fail_first
    if rank == 0:
        assert engine_call(calls)[:2] == ["vllm", "serve"]


def test_vllm_ray_free_multi_node_mode(run_script):
    s = spec("vllm", 2, 8, args=("--distributed-executor-backend", "mp"))
    for rank in (0, 1):
        (argv,) = run_script(s, rank)
        assert argv[:3] == ["vllm", "serve", MODEL]
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--master-addr") + 1] == "10.0.0.1"
        assert ("--headless" in argv) == (rank == 1)
    assert "ray" not in build_server_command(s).script


def test_trtllm_multi_gpu_runs_under_its_mpi_launcher(run_script):
    argv = engine_call(run_script(spec("trtllm", 2, 8), 1))
    assert argv[:3] == ["trtllm-llmapi-launch", "trtllm-serve", MODEL]
    assert build_server_command(spec("trtllm", 2, 8)).tasks_per_node == 8
    assert build_server_command(spec("trtllm", 1, 1)).script.startswith("trtllm-serve ")


# --- the user's flags win ---


def words(s: ServerSpec) -> list[str]:
    return shlex.split(build_server_command(s).script)


@pytest.mark.parametrize(
    "s,present,absent",
    [
        (spec("vllm", 1, 8, args=("--tensor-parallel-size", "4")), ["--tensor-parallel-size", "4"], ["8"]),
        (spec("vllm", 1, 0, args=("--dtype=bfloat16",)), ["--dtype=bfloat16"], ["float32"]),
        (spec("sglang", 1, 8, args=("--tp", "4")), ["--pp-size", "2"], ["--tp-size"]),
        (spec("sglang", 2, 8, args=("--dist-init-addr", "10.0.0.1:30000")), ["10.0.0.1:30000"],
         ["$SERVEGEN_HEAD_IP:20000"]),
        (spec("trtllm", 2, 8, args=("--pp_size", "2")), ["--tp_size", "8"], ["16"]),
        (spec("trtllm", 1, 1, args=("--backend", "tensorrt")), ["tensorrt"], ["pytorch"]),
        (spec("nemo", 1, 8, args=("tensor_model_parallel_size=4",)), ["pipeline_model_parallel_size=2"],
         ["tensor_model_parallel_size=8"]),
        (spec("nemo", 1, 1, args=("++port=6000",)), ["++port=6000"], ["port=5000"]),
        (spec("megatron", 1, 8, args=("--micro-batch-size=2", "--pipeline-model-parallel-size", "2")),
         ["--tensor-model-parallel-size", "4"], ["--micro-batch-size"]),
        (spec("megatron_openai", 2, 8, args=("--tensor-model-parallel-size=4", "--frontend-replicas", "8")),
         ["--pipeline-model-parallel-size", "4", "--micro-batch-size"], ["--tensor-model-parallel-size"]),
        (spec("hf", 1, 8, args=("--device", "cuda:1")), ["cuda:1"], ["auto"]),
        (spec("hf", 1, 0, args=("--cb-max-memory-percent", "0.2")), ["0.2", "--continuous-batching"], ["0.05"]),
        (spec("hf", 1, 0, args=("--continuous-batching",)), ["--cb-max-memory-percent", "0.05"], []),
        (spec("hf", 1, 0, args=("--no-continuous-batching",)), ["--no-continuous-batching"],
         ["--continuous-batching", "--cb-max-memory-percent"]),
    ],
    ids=lambda x: x.server_type if isinstance(x, ServerSpec) else None,
)
def test_user_args_replace_defaults(s, present, absent):
    w = words(s)
    assert w[-len(s.args):] == list(s.args)
    for p in present:
        assert p in w
    for a in absent:
        assert a not in w
    # a default the user set appears once: theirs
    for flag in s.args:
        if flag.startswith("-") and "=" not in flag:
            assert w.count(flag) == 1


# --- impossible requests: one clear line ---


@pytest.mark.parametrize(
    "s,message",
    [
        (spec("sglang", 1, 0), "sglang needs GPUs"),
        (spec("trtllm", 1, 0), "trtllm needs GPUs"),
        (spec("nemo", 1, 0), "nemo needs GPUs"),
        (spec("megatron", 2, 0), "megatron needs GPUs"),
        (spec("megatron_openai", 1, 0), "megatron_openai needs GPUs"),
        (spec("hf", 2, 1), "runs on one node; use --server_nodes 1"),
        (spec("hf", 2, 0), "runs on one node"),
        (spec("vllm", 2, 0), "runs on one node"),
        (spec("trtllm", 1, 8, args=("--tp_size", "3")), "--tp_size 3 does not divide the 8 GPUs asked for"),
        (spec("sglang", 2, 8, args=("--pp-size", "3")), "--pp-size 3 does not divide the 16 GPUs"),
        (spec("nemo", 1, 8, args=("tensor_model_parallel_size=2", "pipeline_model_parallel_size=2")),
         "tensor_model_parallel_size 2 x pipeline_model_parallel_size 2 does not use the 8 GPUs"),
        (spec("megatron", 1, 8, args=("--tensor-model-parallel-size", "eight")), "must be a whole number"),
        (spec("trtllm", 1, 8, model="/models/my model"), "trtllm-llmapi-launch re-splits its command on spaces"),
        (spec("trtllm", 2, 1, args=("--config", "/cfg/*.yml")), "'/cfg/*.yml' cannot reach trtllm-serve"),
    ],
    ids=lambda x: x.server_type if isinstance(x, ServerSpec) else None,
)
def test_impossible_requests_raise_one_line(s, message):
    with pytest.raises(ServegenError) as e:
        build_server_command(s)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("server_type,body_key", [("nemo", "sentences"), ("megatron", "prompts")])
def test_rest_probes_send_a_one_token_request(server_type, body_key):
    c = build_server_command(spec(server_type))
    body = json.loads(c.health_body)
    assert c.health_method == "PUT"
    assert body[body_key] == ["ping"] and body["tokens_to_generate"] == 1


def test_script_locations_follow_the_environment(run_script, tmp_path):
    assert build_server_command(spec("megatron")).env["SERVEGEN_MEGATRON_DIR"] == "/opt/Megatron-LM"
    argv = engine_call(run_script(spec("megatron"), SERVEGEN_MEGATRON_DIR=str(tmp_path / "src" / "Megatron-LM")))
    assert argv[5] == str(tmp_path / "src" / MEGATRON_SCRIPT)
    argv = engine_call(run_script(spec("nemo"), SERVEGEN_NEMO_DIR=str(tmp_path / "src" / "NeMo")))
    assert argv[1] == str(tmp_path / "src" / NEMO_SCRIPT)


@pytest.mark.parametrize("text, words", [
    ("--max-model-len 8192 --dtype float32", ("--max-model-len", "8192", "--dtype", "float32")),
    ("--name 'two words' --x=\"y z\"", ("--name", "two words", "--x=y z")),
    # a JSON value stays one word, its quotes kept: no quoting within the quotes of --server_args
    ('--structured-outputs-config {"backend": "xgrammar", "disable_any_whitespace": true} --enforce-eager',
     ("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}', "--enforce-eager")),
    ('--hf-overrides {"rope_scaling": {"type": "yarn", "factor": [4, "x y"]}}',
     ("--hf-overrides", '{"rope_scaling": {"type": "yarn", "factor": [4, "x y"]}}')),
    ("--lora-modules [1,2] --a {x}", ("--lora-modules", "[1,2]", "--a", "{x}")),  # {x}: not JSON, the shell's way
    ("--cfg '{\"a\": 1}'", ("--cfg", '{"a": 1}')),  # quoted the shell's way: still right
    ("", ()),
])
def test_server_args_split_as_the_shell_does_but_json_values_stay_whole(text, words):
    from servegen.server.command import split_args

    assert split_args(text) == words


def test_server_args_that_cannot_be_split_are_one_clear_error():
    from servegen.server.command import split_args

    with pytest.raises(ServegenError, match=r"--server_args cannot be parsed \(No closing quotation\)"):
        split_args("--name 'unclosed")


# --- vLLM's own argument parser (vLLM 0.32, installed here): a misspelt or removed flag fails ---


@pytest.fixture(scope="module")
def vllm_parsers():
    """(parser of `vllm serve`, parser of the CPU build's api_server module), as vLLM builds them."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    serve = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(serve.add_subparsers(dest="subparser"))
    return serve, make_arg_parser(FlexibleArgumentParser(prog="api_server"))


def vllm_parse(parsers, argv: list[str]):
    serve, module = parsers
    if argv[:2] == ["vllm", "serve"]:
        return serve.parse_args(argv[1:])
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"], argv
    return module.parse_args(argv[3:])


USER_ARGS = ("--max-model-len", "4096", "--enable-prefix-caching", "--served-model-name", "llama")


@pytest.mark.parametrize("with_args", [False, True], ids=["defaults", "server_args"])
@pytest.mark.parametrize(
    "nodes, gpus, backend", [(1, 1, None), (1, 8, None), (2, 1, None), (2, 8, None), (2, 8, "mp"), (1, 0, None)]
)
def test_every_vllm_command_parses_with_vllms_own_parser(vllm_parsers, run_script, nodes, gpus, backend, with_args):
    args = (*(("--distributed-executor-backend", backend) if backend else ()), *(USER_ARGS if with_args else ()))
    s = spec("vllm", nodes, gpus, args=args)
    ranks = range(nodes) if backend == "mp" else [0]  # Ray workers run no vLLM
    for rank in ranks:
        parsed = vllm_parse(vllm_parsers, engine_call(run_script(s, rank)))
        model = parsed.model_tag if gpus else parsed.model
        assert (model, parsed.host, parsed.port) == (MODEL, "127.0.0.1", 5000)
        if gpus:
            assert (parsed.tensor_parallel_size, parsed.pipeline_parallel_size) == (gpus, nodes)
        if nodes > 1:
            assert parsed.distributed_executor_backend == (backend or "ray")
        if backend == "mp":
            assert (parsed.nnodes, parsed.node_rank, parsed.master_addr, parsed.headless) == (2, rank, "10.0.0.1", rank > 0)
        if gpus == 0:
            assert (parsed.dtype, parsed.enforce_eager, parsed.enable_chunked_prefill) == ("float32", True, False)
            assert parsed.structured_outputs_config.disable_any_whitespace is True
        if with_args:
            assert (parsed.max_model_len, parsed.enable_prefix_caching, parsed.served_model_name) == (4096, True, ["llama"])


def test_a_misspelt_server_arg_fails_vllms_parser(vllm_parsers, run_script):
    argv = engine_call(run_script(spec("vllm", 1, 8, args=("--tensor-paralel-size", "4"))))
    with pytest.raises(SystemExit) as e:
        vllm_parse(vllm_parsers, argv)
    assert e.value.code == 2


# --- transformers serve's own parser (the click app of transformers 5.19, installed here) ---


def transformers_parse(argv: list[str]):
    """The parameters `transformers serve` would run with, parsed by its own CLI without running."""
    from transformers.cli.transformers import app

    assert argv[:2] == ["transformers", "serve"], argv
    ctx = app.make_context("transformers", ["serve"])
    return app.get_command(ctx, "serve").make_context("serve", argv[2:], parent=ctx).params


@pytest.mark.parametrize("with_args", [False, True], ids=["defaults", "server_args"])
@pytest.mark.parametrize("gpus, device", [(0, "cpu"), (1, "cuda"), (8, "auto")])
def test_every_hf_command_parses_with_transformers_own_parser(run_script, gpus, device, with_args):
    args = ("--attn-implementation", "sdpa", "--model-timeout", "60") if with_args else ()
    params = transformers_parse(engine_call(run_script(spec("hf", 1, gpus, args=args))))
    assert (params["force_model"], params["host"], params["port"], params["device"]) == (MODEL, "127.0.0.1", 5000, device)
    assert params["continuous_batching"] is True
    assert (params["dtype"], params["cb_max_memory_percent"]) == (("float32", 0.05) if gpus == 0 else ("auto", None))
    if with_args:
        assert (params["attn_implementation"], params["model_timeout"]) == ("sdpa", 60)


def test_a_misspelt_server_arg_fails_transformers_parser(run_script):
    import click

    with pytest.raises(click.exceptions.NoSuchOption, match="--devise"):
        transformers_parse(engine_call(run_script(spec("hf", 1, 1, args=("--devise", "cpu")))))
