"""The single-machine Slurm test cluster (tests/slurm/start.sh) does what later tests rely
on: two nodes with fake GPUs, batch jobs, arrays, dependencies, accounting, submitit."""

import os
import time

import pytest
import submitit

from slurm import cluster
from slurm.cluster import (
    GPUS_PER_NODE,
    NODES,
    PARTITION,
    require_slurm,
    sbatch,
    slurm,
    wait_for_job,
    wait_for_sacct,
)

pytestmark = pytest.mark.slurm


def test_sinfo_shows_two_idle_nodes_in_batch():
    require_slurm()
    out = slurm("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T %c %G")
    assert out.split("\n")[:-1] == [f"{node} idle 8 gpu:{GPUS_PER_NODE}" for node in NODES]
    assert slurm("sinfo", "-h", "-o", "%P").split() == [f"{PARTITION}*"]  # the default partition


def test_sbatch_wrap_job_completes_with_its_output(tmp_path):
    require_slurm()
    out = tmp_path / "out.txt"
    job = sbatch("-o", str(out), "--wrap", "echo hello from $SLURM_JOB_PARTITION on $SLURMD_NODENAME")
    assert wait_for_job(job) == "COMPLETED"
    words = out.read_text().split()
    assert words[:4] == ["hello", "from", PARTITION, "on"] and words[4] in NODES


def test_gres_job_sees_two_gpus(tmp_path):
    require_slurm()
    out = tmp_path / "gpus.txt"
    job = sbatch("--gres=gpu:2", "-o", str(out), "--wrap", "echo $CUDA_VISIBLE_DEVICES")
    assert wait_for_job(job) == "COMPLETED"
    ids = out.read_text().strip().split(",")
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(i.isdigit() and int(i) < GPUS_PER_NODE for i in ids), ids


def test_srun_on_two_nodes_runs_on_both():
    require_slurm()
    out = slurm(
        "srun", "-N2", "--ntasks-per-node=1", "-p", PARTITION, "bash", "-c", "echo $SLURMD_NODENAME", timeout=60
    )
    assert sorted(out.split()) == list(NODES)


def test_job_array_runs_every_task(tmp_path):
    require_slurm()
    job = sbatch("--array=0-3", "-o", str(tmp_path / "%a.out"), "--wrap", "echo task $SLURM_ARRAY_TASK_ID")
    assert wait_for_job(job) == "COMPLETED"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.out" for i in range(4)]
    for i in range(4):
        assert (tmp_path / f"{i}.out").read_text() == f"task {i}\n"


def test_afterok_child_of_failed_job_is_cancelled(tmp_path):
    require_slurm()
    # Held until the child is queued: a dependency on an already failed job is refused.
    parent = sbatch("--hold", "-o", "/dev/null", "--wrap", "exit 3")
    child = sbatch(f"--dependency=afterok:{parent}", "-o", str(tmp_path / "child.out"), "--wrap", "echo ran")
    slurm("scontrol", "release", parent)
    assert wait_for_job(parent) == "FAILED"
    assert wait_for_job(child) == "CANCELLED"
    assert "Reason=DependencyNeverSatisfied" in slurm("scontrol", "show", "job", child)
    assert not (tmp_path / "child.out").exists()


def test_sacct_reports_finished_jobs():
    require_slurm()
    ok = sbatch("-o", "/dev/null", "--wrap", "true")
    failed = sbatch("-o", "/dev/null", "--wrap", "exit 3")
    assert wait_for_sacct(ok) == ("COMPLETED", "0:0")
    assert wait_for_sacct(failed) == ("FAILED", "3:0")


def _executor(folder) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # timeout_min >= 5: under ~10 min submitit takes its own USR2 (sent 90 s before the
    # limit) as a timeout and gives up on a job that is not checkpointable.
    executor.update_parameters(slurm_partition=PARTITION, timeout_min=5, mem_gb=1, cpus_per_task=1, gpus_per_node=1)
    return executor


def test_submitit_job_returns_its_result(tmp_path):
    require_slurm()

    def where(x):  # defined here so that cloudpickle ships it by value
        return x * 2, os.environ["SLURMD_NODENAME"], os.environ["CUDA_VISIBLE_DEVICES"]

    job = _executor(tmp_path).submit(where, 21)
    assert wait_for_job(job.job_id) == "COMPLETED"
    doubled, node, gpus = job.result()
    assert doubled == 42 and node in NODES and gpus.isdigit()


def test_submitit_job_that_raises_is_a_failed_job_error(tmp_path):
    require_slurm()
    job = _executor(tmp_path).submit(int, "not a number")
    assert wait_for_job(job.job_id) == "FAILED"
    with pytest.raises(submitit.core.utils.FailedJobError, match="ValueError: invalid literal for int"):
        job.result()


def test_preempted_submitit_job_checkpoints_requeues_and_finishes(tmp_path):
    require_slurm()
    runs = tmp_path / "runs.txt"

    class Job(submitit.helpers.Checkpointable):  # local, so cloudpickle ships it by value
        def __call__(self, runs):
            first = not runs.exists()
            with runs.open("a") as f:
                f.write(os.environ["SLURMD_NODENAME"] + "\n")
            if first:
                time.sleep(120)  # until preempted
            return len(runs.read_text().split())

    executor = _executor(tmp_path)
    executor.update_parameters(cpus_per_task=8, gpus_per_node=0)  # a whole node
    job = executor.submit(Job(), runs)
    deadline = time.monotonic() + 60
    while not runs.exists():
        assert time.monotonic() < deadline, f"submitit job {job.job_id} did not start in 60 s"
        time.sleep(0.25)
    node = runs.read_text().strip()
    # QOS "high" preempts "normal": Slurm sends the job its USR2 at once
    # (preempt_send_user_signal); submitit checkpoints and runs `scontrol requeue`.
    high = sbatch("--qos=high", "-w", node, "-c", "8", "-o", "/dev/null", "--wrap", "true")
    assert wait_for_job(high) == "COMPLETED"
    # Requeued jobs wait AuthInfo=cred_expire (20 s) before they may start again.
    assert wait_for_job(job.job_id, timeout_s=90) == "COMPLETED"
    assert job.result() == 2
    assert slurm("scontrol", "show", "job", job.job_id).count("Restarts=1") == 1


def test_require_slurm_fails_with_the_start_hint_without_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(cluster, "_down_reason", None)
    with pytest.raises(pytest.fail.Exception, match="run tests/slurm/start.sh"):
        require_slurm()
