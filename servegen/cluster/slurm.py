"""The Slurm executor, on submitit: a JobSpec becomes an sbatch job (or a job array, one task
per command) with the partition, account, qos, time limit, GPUs, nodes, job name prefix and
extra sbatch arguments of the cluster config. Jobs are submitit Checkpointables: on timeout or
preemption they are requeued and their bodies resume from their files."""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths
from submitit.slurm.slurm import _make_sbatch_string

from servegen.cluster.config import ClusterConfig
from servegen.cluster.jobs import JobCommand, JobSpec, shell_env
from servegen.errors import ServegenError, one_line

DEFAULT_TIME_LIMIT_MIN = 240  # when neither --time_limit nor the config's `timeouts` says
# Requeues a job may spend on timeouts (submitit's max_num_timeout); then it fails and its
# follow-up jobs (--dependent_jobs) take over. submitit takes a USR2 for a timeout once the job
# has run min(0.8 x limit, limit - 10 min): under a 10-minute limit every USR2 counts, a
# preemption's too. Preemptions of longer jobs are requeued without counting.
MAX_REQUEUES = 10


def sbatch_parameters(job: JobSpec, cluster: ClusterConfig) -> dict:
    partition = job.partition or cluster.partition
    time_limit = job.time_limit_min or cluster.time_limit_minutes(partition) or DEFAULT_TIME_LIMIT_MIN
    params = {
        "job_name": cluster.job_name_prefix + job.name,
        "time": time_limit,
        "nodes": job.nodes,
        "ntasks_per_node": 1,
        # submitit's USR2 comes this long before the limit: time enough to stop the server
        "signal_delay_s": min(90, max(15, time_limit * 60 // 4)),
        "wckey": None,
        "stderr_to_stdout": True,
    }
    if partition:
        params["partition"] = partition
    if cluster.account:
        params["account"] = cluster.account
    if cluster.qos:
        params["qos"] = cluster.qos
    if job.gpus_per_node:
        params["gpus_per_node"] = job.gpus_per_node
    r = job.resources
    if r.cpus_per_task:
        params["cpus_per_task"] = r.cpus_per_task
    if r.mem is not None:
        params["mem"] = r.mem
    if r.mem_per_gpu is not None:
        params["mem_per_gpu"] = r.mem_per_gpu
    if r.exclusive:
        params["exclusive"] = True
    extra = dict(cluster.sbatch_args)
    if job.time_min:
        extra["time-min"] = job.time_min
    if job.dependencies:
        extra["dependency"] = "afterany:" + ":".join(job.dependencies)
    if extra:
        params["additional_parameters"] = extra
    return params


def sbatch_script(job: JobSpec, cluster: ClusterConfig) -> str:
    """The sbatch script submitit writes for the job."""
    folder = job.log_dir
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    n = len(job.commands)
    return _make_sbatch_string(command=command, folder=folder, map_count=n if n > 1 else None,
                               **sbatch_parameters(job, cluster))


def sbatch_text(job: JobSpec, cluster: ClusterConfig) -> str:
    """What --dry_run prints: the sbatch script submitit writes, then what each task runs."""
    script = sbatch_script(job, cluster)
    assigns = "".join(a + " " for a in shell_env(job.command_env()))
    # the array index (SLURM_ARRAY_TASK_ID, %a in the log name), not the srun task (%t)
    name = (lambda i: f"array task {i}") if len(job.commands) > 1 else (lambda i: "the job")
    what = [f"# {name(i)} runs: {assigns}{shlex.join(argv)}" for i, argv in enumerate(job.commands)]
    return f"# sbatch script of job {cluster.job_name_prefix}{job.name}\n{script}\n" + "\n".join(what) + "\n"


@dataclass(frozen=True)
class SlurmJob:
    """A submitted job (an array: its first task's): its id, its log as submitit names it, its
    state."""

    job_id: str
    log_dir: Path

    def log(self, task: int = 0) -> Path:
        """The log of the job's srun task `task` (stdout and stderr: stderr_to_stdout)."""
        return JobPaths(self.log_dir, job_id=self.job_id, task_id=task).stdout

    def state(self) -> str | None:
        return job_state(self.job_id)

    def cancel(self) -> None:
        cancel(self.job_id)


def submit(job: JobSpec, cluster: ClusterConfig) -> SlurmJob:
    """Submit the job (an array if it has several commands)."""
    executor = submitit.SlurmExecutor(folder=job.log_dir, max_num_timeout=MAX_REQUEUES)
    params = sbatch_parameters(job, cluster)
    executor.update_parameters(**params)
    # USR2 comes at least signal_delay_s before the limit: the body must have stopped by then
    env = job.command_env()
    commands = [JobCommand(argv, env, stop_grace_s=params["signal_delay_s"] * 2 // 3) for argv in job.commands]
    try:
        if len(commands) == 1:
            return SlurmJob(executor.submit(commands[0]).job_id, job.log_dir)
        with executor.batch():
            jobs = [executor.submit(c) for c in commands]
        return SlurmJob(jobs[0].job_id.split("_")[0], job.log_dir)
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as e:
        raise ServegenError(f"sbatch refused the job: {one_line(e)}") from None


def follow_up_name(name: str, i: int) -> str:
    """The name of the i-th follow-up job (--dependent_jobs) of the job `name`."""
    return f"{name}-dependent{i}"


def jobs_named(name: str) -> list[str]:
    """Ids of our pending or running jobs named `name` or named as its follow-ups: waiting for an
    experiment means waiting for the follow-up jobs that finish what its first job could not."""
    out = subprocess.run(["squeue", "--me", "-h", "-o", "%A %j"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ServegenError(f"squeue failed: {out.stderr.strip()}")
    ours = re.compile(re.escape(name) + r"(-dependent\d+)?")  # see follow_up_name
    jobs = {job for job, _, job_name in (line.partition(" ") for line in out.stdout.splitlines())
            if ours.fullmatch(job_name)}
    return sorted(jobs, key=int)


def job_state(job_id: str) -> str | None:
    """The job's state (RUNNING, PENDING, COMPLETED, ...), from squeue while it lives, then sacct."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.split():
        return out.stdout.split()[0]
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    states = out.stdout.split()
    return states[0].split()[0] if states else None


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)
