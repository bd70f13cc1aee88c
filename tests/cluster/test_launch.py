"""How the cluster layer wraps a server command: what a container gets from the host, the
model folder seen through the container's mounts, and the head node's ports of a job."""

import socket
from pathlib import Path

import pytest

from servegen.cluster.config import parse_cluster_config
from servegen.cluster.jobs import WHOLE_NODES_ENV, JobSpec
from servegen.cluster.launch import head_ports, local_launch, srun_launch
from servegen.server import build_server_command
from servegen.server.command import ServerSpec


def config(tmp_path: Path, **raw):
    return parse_cluster_config({"executor": "slurm", **raw}, tmp_path / "c.yaml")


def test_path_here_goes_through_the_deepest_mount(tmp_path):
    c = config(tmp_path, containers={"vllm": "img"}, mounts=["/lustre:/data", "/fast/models:/data/models:ro"])
    assert c.path_here("/data/models/llama", "vllm") == "/fast/models/llama"
    assert c.path_here("/data/x", "vllm") == "/lustre/x"
    assert c.path_here("/data", "vllm") == "/lustre"
    assert c.path_here("/database/x", "vllm") is None  # not under /data: inside the image
    assert c.path_here("/opt/model", "vllm") is None
    assert c.path_here("/opt/model", "sglang") == "/opt/model"  # no container: the path itself


@pytest.mark.parametrize("containerised", [False, True])
def test_a_model_folder_behind_a_mount_runs_offline(tmp_path, monkeypatch, containerised):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    raw = {"containers": {"vllm": "img"}, "mounts": [f"{tmp_path / 'models'}:/models:ro"]} if containerised else {}
    c = config(tmp_path, **raw)
    model = "/models/llama" if containerised else str(tmp_path / "models" / "llama")
    spec = ServerSpec("vllm", model, gpus=8, nodes=2)
    assert srun_launch(spec, build_server_command(spec), c, None).env["HF_HUB_OFFLINE"] == "1"
    elsewhere = ServerSpec("vllm", "/models/other" if containerised else "/nowhere/llama", gpus=8, nodes=2)
    assert "HF_HUB_OFFLINE" not in srun_launch(elsewhere, build_server_command(elsewhere), c, None).env
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the caller's own value wins
    assert "HF_HUB_OFFLINE" not in srun_launch(spec, build_server_command(spec), c, None).env


def test_a_container_takes_every_variable_servegen_sets_from_the_host(tmp_path, monkeypatch):
    """pyxis gives an image's own exported values precedence: every name servegen sets (engine
    defaults, the caller's values of them, the config's env_vars, the head's address) is named
    in --container-env; docker's -e NAME already wins over the image."""
    monkeypatch.setenv("VLLM_NO_USAGE_STATS", "0")  # the caller's value of an engine default
    c = config(tmp_path, containers={"vllm": "img"}, env_vars=["HF_HOME=/cache", "NCCL_DEBUG=INFO"])
    spec = ServerSpec("vllm", "/models/llama", gpus=8, nodes=2)
    argv = srun_launch(spec, build_server_command(spec), c, None).argv
    (flag,) = [a for a in argv if a.startswith("--container-env=")]
    assert flag.split("=", 1)[1].split(",") == [
        "DO_NOT_TRACK", "HF_HOME", "NCCL_DEBUG", "SERVEGEN_HEAD_HOST", "SERVEGEN_MASTER_PORT", "SERVEGEN_NUM_NODES",
        "SERVEGEN_RAY_CLIENT_PORT", "SERVEGEN_RAY_DASHBOARD_PORT", "VLLM_NO_USAGE_STATS"]
    assert argv.index(flag) < argv.index("bash")
    bare = srun_launch(spec, build_server_command(spec), config(tmp_path), None)
    assert not any(a.startswith("--container-env") for a in bare.argv)  # no container, no flag
    local = local_launch(ServerSpec("vllm", "/models/llama", gpus=1), build_server_command(spec),
                         parse_cluster_config({"executor": "local", "containers": {"vllm": "img"},
                                               "env_vars": ["HF_HOME=/cache"]}, tmp_path / "l.yaml"))
    assert ["-e", "HF_HOME"] == local.argv[local.argv.index("HF_HOME") - 1:local.argv.index("HF_HOME") + 1]


def test_a_step_of_one_rank_per_gpu_overcommits_and_shares_the_jobs_cpus(tmp_path):
    """trtllm on 8 GPUs runs 8 MPI ranks per node in a job of one task per node: the step
    overcommits, splits the job's CPUs between its ranks, and uses the config's MPI plugin."""
    spec = ServerSpec("trtllm", "/models/llama", gpus=8, nodes=1)
    command = build_server_command(spec)
    assert command.tasks_per_node == 8 and command.mpi
    argv = srun_launch(spec, command, config(tmp_path), 64).argv
    assert {"--ntasks-per-node=8", "--overcommit", "--cpus-per-task=8", "--mpi=pmix"} <= set(argv)
    assert "--cpus-per-task" not in " ".join(srun_launch(spec, command, config(tmp_path), 4).argv)  # fewer CPUs than ranks
    assert not any(a.startswith("--mpi") for a in srun_launch(spec, command, config(tmp_path, mpi="none"), None).argv)
    assert "--mpi=pmi2" in srun_launch(spec, command, config(tmp_path, mpi="pmi2"), None).argv
    one = ServerSpec("vllm", "/models/llama", gpus=8, nodes=2)
    argv = srun_launch(one, build_server_command(one), config(tmp_path), 32).argv
    assert "--cpus-per-task=32" in argv and "--overcommit" not in argv and not any(a.startswith("--mpi") for a in argv)


def test_head_ports_are_free_ports_unless_the_job_has_its_nodes_to_itself(monkeypatch):
    """Two jobs sharing a node must not both take Ray's 6379 (or SGLang's 20000, Megatron's
    6000): each job's head picks free ones; a job with whole nodes (--exclusive) the defaults."""
    command = build_server_command(ServerSpec("vllm", "/models/llama", gpus=8, nodes=2))
    monkeypatch.delenv(WHOLE_NODES_ENV, raising=False)
    ports = head_ports(command)
    assert list(ports) == ["SERVEGEN_MASTER_PORT", "SERVEGEN_RAY_CLIENT_PORT", "SERVEGEN_RAY_DASHBOARD_PORT"]
    numbers = [int(p) for p in ports.values()]
    assert len(set(numbers)) == 3 and not set(numbers) & {6379, 10001, 8265}
    for port in numbers:  # free on every address, as other nodes connect to it
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
    monkeypatch.setenv(WHOLE_NODES_ENV, "1")
    assert head_ports(command) == {"SERVEGEN_MASTER_PORT": "6379", "SERVEGEN_RAY_CLIENT_PORT": "10001",
                                   "SERVEGEN_RAY_DASHBOARD_PORT": "8265"}
    assert head_ports(build_server_command(ServerSpec("vllm", "/m", gpus=8))) == {}  # one node: none


def test_a_job_with_whole_nodes_tells_its_commands(tmp_path):
    plain = JobSpec(name="j", commands=[["true"]], env={"A": "1"})
    assert plain.command_env() == {"A": "1"}
    whole = JobSpec(name="j", commands=[["true"]], env={"A": "1"},
                    resources=config(tmp_path, exclusive=True).resources)
    assert whole.command_env() == {"A": "1", WHOLE_NODES_ENV: "1"}


def test_a_local_container_gets_the_head_ports_by_name(tmp_path):
    spec = ServerSpec("megatron", "/models/llama", gpus=1)
    local = local_launch(spec, build_server_command(spec),
                         parse_cluster_config({"executor": "local", "containers": {"megatron": "img"}}, tmp_path / "l.yaml"))
    i = local.argv.index("SERVEGEN_MASTER_PORT")
    assert local.argv[i - 1] == "-e" and i < local.argv.index("img")
