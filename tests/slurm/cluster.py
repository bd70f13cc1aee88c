"""Helpers for tests that need the real single-machine Slurm cluster (tests/slurm/start.sh).

Any test under tests/ can import them as `from slurm.cluster import require_slurm, ...`:
pytest puts tests/ on sys.path for tests/conftest.py, and tests/slurm is a package.
A test that needs Slurm calls require_slurm() first; it fails (never skips) when the
cluster is not up.
"""

import subprocess
import time
import uuid

import pytest

PARTITION = "batch"
NODES = ("node1", "node2")
GPUS_PER_NODE = 4
START_HINT = "run tests/slurm/start.sh (as root) to start it; see docs/slurm-test-cluster.md"

# Job states after which a job never runs again (REQUEUED, PREEMPTED under
# PreemptMode=REQUEUE, and COMPLETING are not final).
FINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
)
_UP_STATES = {"idle", "mixed", "allocated", "completing"}


# Set once the cluster is found down: later tests then fail at once instead of each
# waiting ~9 s for sinfo to give up on an absent slurmctld.
_down_reason: str | None = None


def require_slurm() -> None:
    """Fails the calling test unless both nodes of partition `batch` take jobs."""
    global _down_reason
    _down_reason = _down_reason or _why_down() or None
    if _down_reason:
        pytest.fail(f"{_down_reason}: {START_HINT}", pytrace=False)


def _why_down() -> str:
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True, timeout=15
        )
    except FileNotFoundError:
        return "Slurm is not installed (no sinfo on PATH)"
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 15 s (slurmctld hung?)"
    if proc.returncode != 0:
        return f"Slurm cluster is not up ({proc.stderr.strip()})"
    states = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip())
    if tuple(sorted(states)) != NODES or not set(states.values()) <= _UP_STATES:
        return f"Slurm nodes are not all up ({states or 'none in partition ' + PARTITION})"
    return ""


def slurm(*cmd: str, timeout: float = 30) -> str:
    """Runs a Slurm command and returns its stdout; fails the test with its stderr if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()}", pytrace=False)
    return proc.stdout


def sbatch(*args: str) -> str:
    """Submits a batch job (sbatch ARGS) and returns its job id."""
    return slurm("sbatch", "--parsable", *args).strip().split(";")[0]


def job_states(job_id: str) -> dict[str, str]:
    """State of each record of a job ("12", or "12_0", "12_1", ... for an array), from
    slurmctld; from sacct once slurmctld has forgotten the job (MinJobAge=3600)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if proc.returncode == 0:
        states = {}
        for line in proc.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
            states[key] = fields["JobState"]
        return states
    out = slurm("sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", job_id)
    # sacct writes "CANCELLED by 0" for cancelled jobs.
    return {jid: state.split()[0] for jid, state in (line.split("|") for line in out.splitlines() if line)}


def wait_for_job(job_id: str, timeout_s: float = 60) -> str:
    """Waits until every record of the job (one, or each array task) is in a final state
    and returns that state; fails the test if it takes longer than timeout_s or if the
    array tasks ended in different states (use job_states() for those)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = job_states(job_id)
        if states and all(s in FINAL_STATES for s in states.values()):
            if len(set(states.values())) > 1:
                pytest.fail(f"job {job_id} tasks ended in different states: {states}", pytrace=False)
            return next(iter(states.values()))
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not finished after {timeout_s:.0f} s: {states or 'unknown job'}", pytrace=False)
        time.sleep(0.25)


def wait_for_sacct(job_id: str, timeout_s: float = 30) -> tuple[str, str]:
    """Waits until sacct (which lags slurmctld by a few seconds) reports a final state
    for the job's allocation; returns (state, exit code), e.g. ("FAILED", "3:0")."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = slurm("sacct", "-n", "-P", "-X", "-o", "State,ExitCode", "-j", job_id).strip()
        if out:
            state, exit_code = out.splitlines()[-1].split("|")
            state = state.split()[0]
            if state in FINAL_STATES:
                return state, exit_code
        if time.monotonic() > deadline:
            pytest.fail(f"sacct has no final state for job {job_id} after {timeout_s:.0f} s: {out!r}", pytrace=False)
        time.sleep(0.5)


def unique(name: str) -> str:
    """An experiment name no other test run uses (the cluster is shared)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def history(job_id: str) -> list[dict]:
    """Every run of a job (sacct --duplicates: a requeued job has one record per run), oldest first."""
    out = slurm("sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id, "-o", "JobID,State,Start,End")
    return [dict(zip(("id", "state", "start", "end"), line.split("|"))) for line in out.splitlines() if line]


def wait_for_history(job_id: str, state: str, timeout_s: float = 30) -> list[dict]:
    """sacct lags slurmctld: wait until its last record of the job says `state`."""
    deadline = time.monotonic() + timeout_s
    while (runs := history(job_id)) and not runs[-1]["state"].startswith(state) and time.monotonic() < deadline:
        time.sleep(0.5)
    return runs


def dependency_of(job_id: str) -> str:
    fields = dict(f.split("=", 1) for f in slurm("scontrol", "-o", "show", "job", job_id).split() if "=" in f)
    return fields["Dependency"]
