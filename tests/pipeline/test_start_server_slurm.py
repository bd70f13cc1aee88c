"""start_server on the real single-machine Slurm cluster (tests/slurm/start.sh): the sbatch script
and server launch it would submit (golden files), the srun step that starts a server across a
job's nodes (golden files for containers and MPI engines), a real vLLM CPU server in a Slurm job
asked a real question and cancelled with Ctrl-C, a server that fails in its job reported with its
log, and a two-node srun step started for real beside submitit's own step."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from servegen.cluster import slurm as slurm_executor
from servegen.cluster.config import load_cluster_config, parse_cluster_config
from servegen.cluster.jobs import JobSpec
from servegen.cluster.launch import srun_launch
from asking import ask_two_plus_two
from processes import as_a_shell_starts
from servegen.server import SERVER_TYPES, build_server_command
from servegen.server.command import ServerSpec
from slurm.cluster import NODES, require_slurm, slurm, unique, wait_for_job, wait_for_sacct

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tests" / "slurm" / "configs" / "test-slurm.yaml"
ENGINE_ENV = ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP", "VLLM_TARGET_DEVICE",
              "SERVEGEN_CONFIG_DIR")


def normalized(text: str, tmp_path: Path) -> str:
    return text.replace(sys.executable, "<python>").replace(str(tmp_path), "<tmp>").replace(str(REPO), "<repo>")


@pytest.mark.parametrize("server_type", SERVER_TYPES)
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (2, 1), (2, 8)])
def test_dry_run_prints_the_sbatch_script_and_the_server_launch(server_type, nodes, gpus, tmp_path, golden):
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", str(CONFIG), "--model", "/models/llama",
         "--server_type", server_type, "--server_gpus", str(gpus), "--server_nodes", str(nodes),
         "--log_dir", str(tmp_path / "logs"), "--dry_run"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )
    assert not (tmp_path / "logs").exists()  # nothing submitted, nothing written
    if result.returncode != 0:  # a shape the engine cannot run: one line, recorded in the golden file
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        text = f"exit 2\n{result.stderr}"
    else:
        text = result.stdout
    golden(f"slurm-{server_type}-{nodes}n-{gpus}g.txt", normalized(text, tmp_path))


def test_dry_run_shows_a_value_from_the_callers_environment_by_name(tmp_path):
    config = tmp_path / "token-slurm.yaml"
    config.write_text("executor: slurm\nenv_vars: [SERVEGEN_TEST_TOKEN, FIXED=plain]\n")
    result = subprocess.run(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", str(config), "--model", "/models/llama",
         "--server_type", "vllm", "--server_gpus", "1", "--dry_run"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "SERVEGEN_TEST_TOKEN": "hf_secret"},
    )
    assert result.returncode == 0, result.stderr
    assert "hf_secret" not in result.stdout  # a token is not printed for all to see
    # in the task's command and in the server launch, pasteable in the same shell
    assert result.stdout.count('SERVEGEN_TEST_TOKEN="$SERVEGEN_TEST_TOKEN" ') == 2
    assert result.stdout.count("FIXED=plain ") == 2


CONTAINER_CONFIG = {
    "executor": "slurm",
    "partition": "gpu",
    "containers": {"vllm": "nvcr.io/nvidia/vllm:25.09-py3", "trtllm": "nvcr.io/nvidia/tensorrt-llm/release:1.0.0"},
    "mounts": ["/lustre/models:/models:ro", "/lustre/cache:/root/.cache"],
    "env_vars": ["HF_HOME=/root/.cache/huggingface"],
    "srun_args": ["--cpu-bind=none"],
}


@pytest.mark.parametrize(
    "name, server_type, nodes, gpus, config",
    [
        ("vllm-2n-8g-container", "vllm", 2, 8, CONTAINER_CONFIG),
        ("trtllm-2n-8g", "trtllm", 2, 8, {"executor": "slurm"}),
        ("trtllm-1n-8g-container", "trtllm", 1, 8, CONTAINER_CONFIG),
    ],
)
def test_srun_launch_golden(name, server_type, nodes, gpus, config, golden, monkeypatch):
    for var in ENGINE_ENV:
        monkeypatch.delenv(var, raising=False)
    spec = ServerSpec(server_type=server_type, model="/models/llama", gpus=gpus, nodes=nodes, port=5000,
                      host="0.0.0.0")
    command = build_server_command(spec)
    launch = srun_launch(spec, command, parse_cluster_config(config, Path(f"{name}.yaml")), cpus_per_task=32)
    golden(f"srun-{name}.txt", f"# {name}: the job's srun step, {nodes} node(s) x {command.tasks_per_node} task(s)\n"
                               f"{launch.shell()}\n")
    flags = launch.argv[:launch.argv.index("bash")]
    assert ("--mpi=pmix" in flags) == command.mpi
    assert any(f.startswith("--container-image=") for f in flags) == ("containers" in config)
    assert flags[:2] == ["srun", "--overlap"] and "--mem=0" in flags


class Output:
    """A process's stdout and stderr lines, read as they come."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((proc.stdout, self.out), (proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: ls.extend(iter(s.readline, "")), daemon=True).start()

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.out:
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the readers catch up
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} (exit {self.proc.poll()}):\n{''.join(self.out)}"
                             f"{''.join(self.err)[-5000:]}")


def job_processes(job_id: str, marker: str = "") -> list[psutil.Process]:
    """Live processes of a Slurm job (by the SLURM_JOB_ID in their environment) whose command
    line contains `marker`."""
    found = []
    for p in psutil.process_iter():
        try:
            if (p.environ().get("SLURM_JOB_ID") == job_id and marker.lower() in " ".join(p.cmdline()).lower()
                    and p.status() != psutil.STATUS_ZOMBIE):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def wait_until_gone(job_id: str, marker: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := job_processes(job_id, marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of job {job_id} still alive: {[p.cmdline() for p in left]}"


def test_real_vllm_server_in_a_slurm_job_answers_and_ctrl_c_cancels_the_job(demo_model, tmp_path):
    require_slurm()
    proc = subprocess.Popen(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", str(CONFIG),
         "--model", str(demo_model), "--server_type", "vllm", "--server_gpus", "0",
         "--log_dir", str(tmp_path / "logs"), "--expname", unique("server")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")},  # sbatch passes it on to the job
        preexec_fn=as_a_shell_starts,
    )
    output = Output(proc)
    try:
        ready = output.wait_for_line(r"ready at (http://\S+) \(Slurm job (\d+)\)", timeout_s=600)
        address, job_id = ready.groups()
        assert any(f"submitted Slurm job {job_id}" in line for line in output.err)
        assert address.startswith("http://127.0.0.1:")  # the node's address (NodeAddr) on this cluster
        assert ask_two_plus_two(address, str(demo_model)) == "2 + 2 = 4."
        servers = [p for p in job_processes(job_id, "vllm.entrypoints")
                   if "start_server" in " ".join(p.parent().cmdline())]
        assert len(servers) == 1, [p.cmdline() for p in servers]  # one server, started once, in the job

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert wait_for_sacct(job_id, timeout_s=60)[0] == "CANCELLED"
        wait_until_gone(job_id, "vllm", timeout_s=60)
        assert not (tmp_path / "logs" / f"server-{job_id}.address").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_server_that_fails_in_its_job_is_an_error_with_its_log(demo_model, tmp_path):
    require_slurm()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", str(CONFIG),
         "--model", str(demo_model), "--server_type", "vllm", "--server_gpus", "0",
         "--server_args", "--dtype nonsense", "--log_dir", str(tmp_path / "logs"), "--expname", unique("bad")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")},
    )
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 240
    job_id = re.search(r"submitted Slurm job (\d+)", result.stderr).group(1)
    assert f"error: Slurm job {job_id} ended (FAILED) before its server was ready:" in result.stderr
    # the job body's own error, then the server log's tail with vLLM's reason
    assert "error: vllm server (pid" in result.stderr and "exited with code 2 before it was ready" in result.stderr
    assert "argument --dtype: invalid choice: 'nonsense'" in result.stderr
    assert f"(the whole job log: {tmp_path / 'logs' / f'{job_id}_0_log.out'})" in result.stderr
    assert "Traceback" not in result.stderr  # submitit's report of the failure is left in the job log
    assert wait_for_sacct(job_id)[0] == "FAILED"


# Runs on every node of the srun step: records where it runs and with what; the head serves /health.
NODE_PROGRAM = """
import http.server, json, os, sys, time
from pathlib import Path
out, port = Path(sys.argv[1]), int(sys.argv[2])
keys = ("SLURMD_NODENAME", "SLURM_STEP_ID", "SERVEGEN_NODE_RANK", "SERVEGEN_HEAD_HOST", "SERVEGEN_NUM_NODES",
        "SERVEGEN_HEAD_IP", "SERVEGEN_NODE_IP", "CUDA_VISIBLE_DEVICES")
info = {k: os.environ.get(k) for k in keys} | {"pid": os.getpid()}
(out / f"node-{info['SERVEGEN_NODE_RANK']}.json").write_text(json.dumps(info))
if info["SERVEGEN_NODE_RANK"] != "0":
    while True:
        time.sleep(1)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(json.dumps(info).encode())

http.server.HTTPServer(("0.0.0.0", port), Health).serve_forever()
"""

# The job body: starts NODE_PROGRAM as a two-node server with start_server_here, as servegen
# starts an engine, checks it, sends its step USR2 (what Slurm sends every step before the time
# limit), stops it, and writes down what it saw.
JOB_BODY = """
import json, os, subprocess, sys, time, urllib.request
from pathlib import Path
from servegen.cluster.config import load_cluster_config
from servegen.cluster.launch import start_server_here
from servegen.server.command import ServerCommand, ServerSpec
from servegen.server.process import free_port

out, config = Path(sys.argv[1]), sys.argv[2]
job = os.environ["SLURM_JOB_ID"]
steps = lambda: subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %N"], capture_output=True,
                               text=True).stdout.split("\\n")[:-1]
port = free_port()
spec = ServerSpec(server_type="vllm", model="unused", gpus=2, nodes=2, port=port, host="0.0.0.0")
command = ServerCommand(script=f"exec {sys.executable} {out / 'node_program.py'} {out} {port}")
server = start_server_here(spec, load_cluster_config(config), out / "server.log", "test server", command=command)
seen = {"argv": server.argv}
server.wait_ready(60)
health = lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10))
seen["health"] = health()
seen["steps_running"] = steps()
server_step = f"{job}.{seen['health']['SLURM_STEP_ID']}"
subprocess.run(["scancel", "--signal=USR2", server_step], check=True)
time.sleep(3)
seen["alive_after_usr2"] = server.proc.poll() is None and health()["pid"] == seen["health"]["pid"]
server.stop()
time.sleep(1)
seen["steps_after_stop"] = steps()
(out / "seen.json").write_text(json.dumps(seen, indent=1))
"""


def test_a_two_node_server_starts_with_srun_beside_submitits_step_and_stops_on_both_nodes(tmp_path):
    require_slurm()
    (tmp_path / "node_program.py").write_text(NODE_PROGRAM)
    (tmp_path / "body.py").write_text(JOB_BODY)
    cluster = load_cluster_config(str(CONFIG))
    job = JobSpec(name=unique("two-nodes"), commands=[[sys.executable, str(tmp_path / "body.py"), str(tmp_path),
                                                      str(CONFIG)]],
                  log_dir=tmp_path / "logs", nodes=2, gpus_per_node=2, time_limit_min=5)
    submitted = slurm_executor.submit(job, cluster)
    job_id = submitted.job_id
    state = wait_for_job(job_id, timeout_s=120)
    log = submitted.log().read_text()
    assert submitted.log() == tmp_path / "logs" / f"{job_id}_0_log.out"  # as submitit names it
    assert state == "COMPLETED", log + (tmp_path / "server.log").read_text()
    seen = json.loads((tmp_path / "seen.json").read_text())

    nodes = [json.loads((tmp_path / f"node-{rank}.json").read_text()) for rank in (0, 1)]
    assert [n["SLURMD_NODENAME"] for n in nodes] == list(NODES)  # rank 0 on the job's first node
    for rank, node in enumerate(nodes):
        assert node["SERVEGEN_NODE_RANK"] == str(rank)
        assert node["SERVEGEN_NUM_NODES"] == "2"
        assert node["SERVEGEN_HEAD_HOST"] == "127.0.0.1"  # node1's NodeAddr
        # found on the node itself: both nodes of the test cluster are this machine's loopback
        assert (node["SERVEGEN_HEAD_IP"], node["SERVEGEN_NODE_IP"]) == ("127.0.0.1", "127.0.0.1")
        assert len(node["CUDA_VISIBLE_DEVICES"].split(",")) == 2  # the step sees the job's GPUs
    assert seen["health"]["pid"] == nodes[0]["pid"]  # the head serves the probe

    server_step = f"{job_id}.{nodes[0]['SLURM_STEP_ID']}"
    # submitit's step (.0, one task per node) and the server's srun step ran at once on both nodes
    assert f"{job_id}.0 node[1-2]" in seen["steps_running"]
    assert f"{server_step} node[1-2]" in seen["steps_running"]
    assert seen["argv"][:2] == ["srun", "--overlap"] and "--mem=0" in seen["argv"]
    assert seen["alive_after_usr2"]  # the server ignores the USR2 Slurm sends before the limit
    # stopped: its step is gone, and no process of it is left on either node
    assert not any(line.startswith(server_step) for line in seen["steps_after_stop"])
    assert not [n["pid"] for n in nodes if psutil.pid_exists(n["pid"])
                and psutil.Process(n["pid"]).status() != psutil.STATUS_ZOMBIE]
    assert job_processes(job_id) == []
    steps = slurm("sacct", "-n", "-P", "-j", job_id, "-o", "JobID,NodeList")
    assert f"{server_step}|node[1-2]" in steps.split()


# In place of `vllm` on the head node: records how it was started and the Ray cluster it finds
# as vLLM would (ray.init() with no address: RAY_ADDRESS decides), then serves /health.
VLLM_RECORDER = """#!{python}
import http.server, json, os, sys
from pathlib import Path
import ray
out = Path(sys.argv[1]); argv = sys.argv[2:]
ray.init(logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
seen = {{"argv": argv, "nodes": len(nodes), "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes),
        **{{k: os.environ.get(k) for k in ("VLLM_HOST_IP", "SERVEGEN_NODE_IP", "RAY_ADDRESS", "SERVEGEN_MASTER_PORT",
                                          "SERVEGEN_RAY_CLIENT_PORT", "SERVEGEN_RAY_DASHBOARD_PORT", "SLURM_JOB_ID")}}}}
(out / f"vllm-{{seen['SLURM_JOB_ID']}}.json").write_text(json.dumps(seen))

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

http.server.HTTPServer(("0.0.0.0", int(argv[argv.index("--port") + 1])), Health).serve_forever()
"""

# The job body: servegen's own two-node vLLM command, run for real (real `ray start` on both
# nodes, the join and wait loops, the head's ports) with only `vllm` replaced by the recorder;
# it stays up until the other job's server is up too, so both Ray clusters share the nodes.
RAY_JOB_BODY = """
import dataclasses, os, sys, time
from pathlib import Path
from servegen.cluster.config import load_cluster_config
from servegen.cluster.launch import start_server_here
from servegen.server import build_server_command
from servegen.server.command import ServerSpec
from servegen.server.process import free_port

out, config = Path(sys.argv[1]), sys.argv[2]
spec = ServerSpec(server_type="vllm", model="/models/llama", gpus=1, nodes=2, port=free_port(), host="0.0.0.0")
command = build_server_command(spec)
command = dataclasses.replace(command, script=command.script.replace("exec vllm ", f"exec {out / 'vllm'} {out} "))
server = start_server_here(spec, load_cluster_config(config), out / f"server-{os.environ['SLURM_JOB_ID']}.log",
                           "vllm server", command=command)
server.wait_ready(240)
(out / f"ready-{os.environ['SLURM_JOB_ID']}").touch()
deadline = time.monotonic() + 240
while len(list(out.glob("ready-*"))) < 2 and time.monotonic() < deadline:
    time.sleep(1)
server.stop()
"""


def test_two_jobs_start_two_node_vllm_servers_on_real_ray_clusters_of_their_own_on_shared_nodes(tmp_path):
    """Item 8 of issue 11 for real: two jobs on the same two nodes, each with Ray's head and worker
    started by servegen's script. Each vLLM (a recorder) finds its own job's two-node Ray cluster,
    on ports its job chose (not Ray's 6379, which one of them could not have had), and after the
    jobs no Ray process is left."""
    require_slurm()
    (tmp_path / "vllm").write_text(VLLM_RECORDER.format(python=sys.executable))
    (tmp_path / "vllm").chmod(0o755)
    (tmp_path / "body.py").write_text(RAY_JOB_BODY)
    cluster = load_cluster_config(str(CONFIG))
    jobs = [slurm_executor.submit(JobSpec(name=unique("ray"), commands=[[sys.executable, str(tmp_path / "body.py"),
                                                                        str(tmp_path), str(CONFIG)]],
                                          log_dir=tmp_path / f"logs{i}", nodes=2, gpus_per_node=1, time_limit_min=10),
                                  cluster).job_id
            for i in range(2)]
    for i, job_id in enumerate(jobs):
        state = wait_for_job(job_id, timeout_s=420)
        log = (tmp_path / f"logs{i}" / f"{job_id}_0_log.out").read_text()
        server_log = tmp_path / f"server-{job_id}.log"
        assert state == "COMPLETED", log + (server_log.read_text() if server_log.exists() else "")
    seen = [json.loads((tmp_path / f"vllm-{job_id}.json").read_text()) for job_id in jobs]
    ports = set()
    for job in seen:
        assert job["argv"][:2] == ["serve", "/models/llama"]
        argv = job["argv"]
        assert [argv[argv.index(f) + 1] for f in ("--tensor-parallel-size", "--pipeline-parallel-size",
                                                   "--distributed-executor-backend")] == ["1", "2", "ray"]
        assert (job["nodes"], job["gpus"]) == (2, 2)  # its own two nodes, not the other job's as well
        assert job["VLLM_HOST_IP"] == job["SERVEGEN_NODE_IP"] == "127.0.0.1"
        assert job["RAY_ADDRESS"] == f"127.0.0.1:{job['SERVEGEN_MASTER_PORT']}"
        ports |= {job[k] for k in ("SERVEGEN_MASTER_PORT", "SERVEGEN_RAY_CLIENT_PORT", "SERVEGEN_RAY_DASHBOARD_PORT")}
    assert len(ports) == 6 and not ports & {"6379", "10001", "8265"}
    for job_id in jobs:  # Ray's daemons ran in the server's step, and ended with it
        wait_until_gone(job_id, "", 30)


# In place of an engine on every node: records how it was started there; the head answers any
# GET or PUT (each engine's readiness probe) on its --port.
ENGINE_RECORDER = """
import http.server, json, os, sys, time
from pathlib import Path
out, argv = Path(sys.argv[1]), sys.argv[2:]
keys = ("SLURMD_NODENAME", "SERVEGEN_NODE_RANK", "SERVEGEN_HEAD_HOST", "SERVEGEN_HEAD_IP", "SERVEGEN_NODE_IP",
        "SERVEGEN_MASTER_PORT")
(out / f"node-{os.environ['SERVEGEN_NODE_RANK']}.json").write_text(json.dumps({"argv": argv, **{k: os.environ.get(k) for k in keys}}))
if os.environ["SERVEGEN_NODE_RANK"] != "0":
    while True:
        time.sleep(1)

class Ok(http.server.BaseHTTPRequestHandler):
    def answer(self):
        self.send_response(200)
        self.end_headers()
    do_GET = do_PUT = answer

http.server.HTTPServer(("0.0.0.0", int(argv[argv.index("--port") + 1])), Ok).serve_forever()
"""

# The job body: servegen's two-node command of an engine, run for real under srun on both nodes,
# with the engine's executable replaced by the recorder.
ENGINE_JOB_BODY = """
import dataclasses, os, sys
from pathlib import Path
from servegen.cluster.config import load_cluster_config
from servegen.cluster.launch import start_server_here
from servegen.server import build_server_command
from servegen.server.command import ServerSpec
from servegen.server.process import free_port

out, config, server_type, engine = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["SERVEGEN_MEGATRON_DIR"] = str(out / "Megatron-LM")  # where the scripts' stand-ins are
spec = ServerSpec(server_type=server_type, model="/models/llama", gpus=1, nodes=2, port=free_port(), host="0.0.0.0")
command = build_server_command(spec)
recorder = f"{sys.executable} {out / 'recorder.py'} {out} "
command = dataclasses.replace(command, script=command.script.replace(engine + " ", recorder, 1))
server = start_server_here(spec, load_cluster_config(config), out / "server.log", "server", command=command)
server.wait_ready(120)
server.stop()
"""


@pytest.mark.parametrize("server_type, engine", [
    ("sglang", "python3 -m sglang.launch_server"), ("megatron", "torchrun"), ("megatron_openai", "torchrun"),
])
def test_each_engines_two_node_step_runs_on_both_nodes_with_the_heads_address_and_port(tmp_path, server_type, engine):
    """Item 8 of issue 11 for the engines other than vLLM: the generated srun step runs on the
    test cluster's two nodes, each node's engine (a recorder) started with its own rank, the
    head's IP found on the node and the one port the job chose on its head node."""
    require_slurm()
    (tmp_path / "recorder.py").write_text(ENGINE_RECORDER)
    (tmp_path / "body.py").write_text(ENGINE_JOB_BODY)
    for script in ("tools/run_text_generation_server.py", "examples/inference/launch_inference_server.py"):
        (tmp_path / "Megatron-LM" / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "Megatron-LM" / script).write_text("")
    job = JobSpec(name=unique(server_type), commands=[[sys.executable, str(tmp_path / "body.py"), str(tmp_path),
                                                        str(CONFIG), server_type, engine]],
                  log_dir=tmp_path / "logs", nodes=2, gpus_per_node=1, time_limit_min=5)
    submitted = slurm_executor.submit(job, load_cluster_config(str(CONFIG)))
    state = wait_for_job(submitted.job_id, timeout_s=180)
    server_log = tmp_path / "server.log"
    assert state == "COMPLETED", submitted.log().read_text() + (server_log.read_text() if server_log.exists() else "")
    nodes = [json.loads((tmp_path / f"node-{rank}.json").read_text()) for rank in (0, 1)]
    assert [n["SLURMD_NODENAME"] for n in nodes] == list(NODES)
    port = nodes[0]["SERVEGEN_MASTER_PORT"]
    assert port.isdigit() and port not in ("20000", "6000") and nodes[1]["SERVEGEN_MASTER_PORT"] == port
    for rank, node in enumerate(nodes):
        argv = node["argv"]
        value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
        assert (node["SERVEGEN_HEAD_IP"], node["SERVEGEN_NODE_IP"]) == ("127.0.0.1", "127.0.0.1")
        if server_type == "sglang":
            assert (value("--nnodes"), value("--node-rank"), value("--dist-init-addr")) == ("2", str(rank), f"127.0.0.1:{port}")
        else:
            assert (value("--nnodes"), value("--node_rank"), value("--master_addr"), value("--master_port")) == (
                "2", str(rank), "127.0.0.1", port)
            assert Path(argv[argv.index("--master_port") + 2]).is_file()  # the script, found on the node
    wait_until_gone(submitted.job_id, "", 30)


def test_cpus_memory_and_whole_nodes_from_the_config_and_the_flags(tmp_path):
    """The config's cpus_per_task/mem/exclusive become #SBATCH lines; each flag wins over its
    key (--mem_per_gpu replacing the config's mem), and the server's srun step gets the CPUs."""
    config = tmp_path / "res-slurm.yaml"
    config.write_text("executor: slurm\ncpus_per_task: 16\nmem: 256G\nexclusive: true\n"
                      "containers: {vllm: img}\n")

    def dry_run(*flags: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", str(config), "--model", "/models/llama",
             "--server_type", "vllm", "--server_gpus", "8", "--log_dir", str(tmp_path / "logs"), "--dry_run", *flags],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    text = dry_run()
    assert {"#SBATCH --cpus-per-task=16", "#SBATCH --mem=256G", "#SBATCH --exclusive"} <= set(text.splitlines())
    assert "--cpus-per-task=16" in text.split("# the job starts the server with")[1]
    # the job's command knows it has whole nodes: its server takes the engines' default ports
    assert "# the job runs: SERVEGEN_WHOLE_NODES=1 " in text
    text = dry_run("--cpus_per_task", "64", "--mem_per_gpu", "80G")
    lines = set(text.splitlines())
    assert {"#SBATCH --cpus-per-task=64", "#SBATCH --mem-per-gpu=80G", "#SBATCH --exclusive"} <= lines
    assert not any(line.startswith("#SBATCH --mem=") for line in lines)
    for flags, message in [(["--mem", "lots"], "--mem must be a Slurm memory size"),
                           (["--mem", "1G", "--mem_per_gpu", "1G"], "give --mem or --mem_per_gpu, not both"),
                           (["--cpus_per_task", "0"], "--cpus_per_task must be a whole number of 1 or more")]:
        result = subprocess.run(
            [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", str(config), "--model", "/m",
             "--server_type", "vllm", "--server_gpus", "8", "--dry_run", *flags],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
    local = subprocess.run(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--cluster", "local", "--model", "/m",
         "--server_type", "vllm", "--server_gpus", "0", "--dry_run", "--exclusive"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert local.returncode == 2 and "--exclusive: for Slurm jobs; cluster 'local' runs on this machine" in local.stderr


@pytest.mark.parametrize("nodes, gpus, commands", [(1, 4, 1), (2, 4, 1), (1, 2, 3)])
def test_the_sbatch_scripts_servegen_writes_pass_sbatch_test_only(tmp_path, nodes, gpus, commands):
    """Each generated script, with CPUs, memory and whole nodes asked for, as the real test
    cluster's sbatch validates it (--test-only: checked against the nodes, nothing queued); one
    asking for more CPUs than a node has is refused, so the check checks."""
    require_slurm()
    from servegen.cluster.config import Resources

    cluster = load_cluster_config(str(CONFIG))

    def test_only(resources: Resources) -> subprocess.CompletedProcess:
        job = JobSpec(name=unique("test-only"), commands=[["true"]] * commands, log_dir=tmp_path / "logs",
                      nodes=nodes, gpus_per_node=gpus, time_limit_min=10, resources=resources)
        script = tmp_path / "job.sh"
        script.write_text(slurm_executor.sbatch_script(job, cluster))
        return subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)

    fits = test_only(Resources(cpus_per_task=4, mem="2G", exclusive=True))
    assert fits.returncode == 0 and "to start at" in fits.stderr, fits.stderr
    assert test_only(Resources(cpus_per_task=6, mem_per_gpu="1G")).returncode == 0
    too_many = test_only(Resources(cpus_per_task=64))
    assert too_many.returncode != 0 and "Requested node configuration is not available" in too_many.stderr
