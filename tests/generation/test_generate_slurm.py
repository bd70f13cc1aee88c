"""`servegen generate` on the real single-machine Slurm cluster (tests/slurm/start.sh): chunks as a
job array merged into one file, jobs already done never resubmitted, a time limit too short for
the dataset (submitit's USR2, requeue and follow-up jobs), scancel and resume, --run_after, and the
whole path with a real vLLM CPU server started inside the job.

The jobs reach the fault-injecting stub server of these tests (--server_address) on 127.0.0.1:
the nodes of this cluster are this machine."""

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from job_helpers import read_jsonl, run_generate, write_dataset

from servegen.demo_model.data import format_question, held_out_pairs
from slurm.cluster import (
    FINAL_STATES,
    dependency_of,
    history,
    job_states,
    require_slurm,
    slurm,
    unique,
    wait_for_history,
    wait_for_job,
    wait_for_sacct,
)

pytestmark = pytest.mark.slurm

CONFIG = Path(__file__).resolve().parents[1] / "slurm" / "configs" / "test-slurm.yaml"
PREFIX = "servegen-test-"  # the config's job_name_prefix


def submit(data: Path, out: Path, *args: str, address: str | None = None, timeout: float = 60) -> list[str]:
    """Run `servegen generate --cluster <test cluster> ...`; the ids of the jobs it submitted."""
    done = run_generate(data, out, "--cluster", str(CONFIG), *args, address=address, timeout=timeout)
    return re.findall(r"submitted (?:job|array of \d+) (\d+) ", done.stdout)


def expected_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "num_generated_tokens": 3, "finish_reason": "stop", "generation": f"reply to {r['question']}"}
            for r in rows]


def test_a_4_chunk_array_merges_into_one_file_and_a_finished_job_is_not_submitted_again(stub, tmp_path):
    require_slurm()
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    rows = write_dataset(data, 22)  # chunks of 5, 6, 5, 6 rows
    name = unique("array")
    [job] = submit(data, out, "--num_chunks", "4", "--expname", name, address=stub.base_url)
    assert wait_for_job(job, timeout_s=120) == "COMPLETED"
    assert set(job_states(job)) == {f"{job}_{i}" for i in range(4)}  # one array, a task per chunk

    assert read_jsonl(out / "output.jsonl") == expected_rows(rows)  # every row once, in input order
    assert (out / "output.jsonl.done").exists()
    assert sorted(p.name for p in out.iterdir()) == ["logs", "output.jsonl", "output.jsonl.done",
                                                     "output.summary.json"]  # no parts, side files or locks
    summary = json.loads((out / "output.summary.json").read_text())
    assert (summary["chunks"], summary["rows"], summary["failed_rows"], summary["generated_tokens"]) == (4, 22, 0, 66)
    assert sum(summary["latency_histogram"].values()) == 22
    assert stub.requests == collections.Counter({r["question"]: 1 for r in rows})

    again = run_generate(data, out, "--cluster", str(CONFIG), "--num_chunks", "4", "--expname", name,
                         address=stub.base_url)
    assert "every output is already done" in again.stdout and "submitted" not in again.stdout
    deadline = time.monotonic() + 30  # sacct lags slurmctld
    while len(named := slurm("sacct", "-n", "-X", "-P", "--name", PREFIX + name, "-o", "JobID").split()) < 4:
        assert time.monotonic() < deadline, named
        time.sleep(0.5)
    assert sorted(named) == [f"{job}_{i}" for i in range(4)]  # that array, and no other job
    assert sum(stub.requests.values()) == 22


def test_a_time_limit_too_short_requeues_the_job_until_every_row_is_done_once(stub, tmp_path):
    """40 rows, one at a time, 2 s each: 80 s of work against a 1-minute limit, whose USR2 comes
    15-45 s into each run (submitit: USR2@15 for 1 minute, and slurmctld checks limits every 30 s)."""
    require_slurm()
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    rows = write_dataset(data, 40, start=1000)
    stub.delay_s = 2.0
    first, *follow_ups = submit(data, out, "--time_limit", "1", "--dependent_jobs", "2", "--expname",
                                unique("short"), "++max_concurrent_requests=1", address=stub.base_url)
    assert len(follow_ups) == 2
    assert re.fullmatch(rf"afterany:{first}(\(unfulfilled\))?", dependency_of(follow_ups[0]))
    assert re.fullmatch(rf"afterany:{follow_ups[0]}(\(unfulfilled\))?", dependency_of(follow_ups[1]))
    for job in (first, *follow_ups):
        wait_for_job(job, timeout_s=600)

    assert read_jsonl(out / "output.jsonl") == expected_rows(rows)
    assert (out / "output.jsonl.done").exists() and not (out / "output.jsonl.unordered").exists()
    # the mechanism, not just the result: runs cut short by the limit, each requeued or followed up
    runs = [run for job in (first, *follow_ups) for run in wait_for_history(job, "COMPLETED")]
    cut_short = [r for r in runs if r["state"] in ("REQUEUED", "TIMEOUT")]
    assert cut_short, runs
    assert runs[-1]["state"] == "COMPLETED"
    log = (out / "logs" / f"{first}_0_log.out").read_text()
    # submitit caught USR2 and requeued; the job body was stopped by its SIGTERM, not killed by USR2
    assert log.count("Caught signal SIGUSR2") >= 1 and "Requeued job" in log
    assert log.count("servegen: stopped") >= log.count("Requeued job")
    # only the row in flight at each cut was sent again
    assert set(stub.requests) == {r["question"] for r in rows}
    assert sum(stub.requests.values()) - len(rows) <= len(cut_short)
    assert max(stub.requests.values()) <= 2


def test_scancel_leaves_a_resumable_state_and_the_next_run_sends_only_missing_rows(stub, tmp_path):
    require_slurm()
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    rows = write_dataset(data, 30, start=2000)
    stub.delay_s = 1.0
    args = ["--expname", unique("cancel"), "++max_concurrent_requests=2"]
    [job] = submit(data, out, *args, address=stub.base_url)
    output = out / "output.jsonl"
    deadline = time.monotonic() + 120
    while (not output.exists() or len(output.read_text().splitlines()) < 6) and time.monotonic() < deadline:
        time.sleep(0.2)
    slurm("scancel", job)
    assert wait_for_job(job, timeout_s=60) == "CANCELLED"

    kept = read_jsonl(output)  # every line whole: the job stopped in order on scancel's SIGTERM
    assert 6 <= len(kept) < 30
    assert kept == expected_rows(rows)[:len(kept)]
    assert not (out / "output.jsonl.done").exists() and not (out / "output.summary.json").exists()
    time.sleep(2.5)  # the requests the job had in flight reach the stub and are answered
    sent_before = collections.Counter(stub.requests)

    [again] = submit(data, out, *args, address=stub.base_url)
    assert again != job
    assert wait_for_job(again, timeout_s=120) == "COMPLETED"
    assert read_jsonl(output) == expected_rows(rows)
    assert (out / "output.jsonl.done").exists()
    resent = stub.requests - sent_before
    assert not any(resent[r["question"]] for r in kept)  # rows already written were not asked again
    assert set(resent) | set(sent_before) == {r["question"] for r in rows}
    assert sum(stub.requests.values()) <= len(rows) + 2  # at most the two in flight at the cancel


def test_run_after_waits_for_the_named_experiment_and_its_follow_up_jobs(stub, tmp_path):
    require_slurm()
    stub.delay_s = 1.0
    first_name = unique("first")
    data1, data2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_dataset(data1, 8, start=3000)
    write_dataset(data2, 3, start=3100)
    first = submit(data1, tmp_path / "out1", "--expname", first_name, "--dependent_jobs", "1",
                   "++max_concurrent_requests=1", address=stub.base_url)
    [second] = submit(data2, tmp_path / "out2", "--expname", unique("second"), "--run_after", first_name,
                      address=stub.base_url)
    waits_for = set(re.findall(r"afterany:(\d+)", dependency_of(second)))
    assert waits_for == set(first)  # the first job and its follow-up
    assert slurm("squeue", "-h", "-j", second, "-o", "%T %r").split() == ["PENDING", "Dependency"]

    assert wait_for_job(second, timeout_s=180) == "COMPLETED"
    ends = [wait_for_history(j, "COMPLETED")[-1]["end"] for j in first]
    start = wait_for_history(second, "COMPLETED")[-1]["start"]
    assert all(end <= start for end in ends), (ends, start)  # ISO times compare as strings
    assert len(read_jsonl(tmp_path / "out1" / "output.jsonl")) == 8
    assert len(read_jsonl(tmp_path / "out2" / "output.jsonl")) == 3


def test_run_after_an_experiment_with_no_live_job_does_not_wait(stub, tmp_path):
    require_slurm()
    data = tmp_path / "data.jsonl"
    write_dataset(data, 2, start=4000)
    done = run_generate(data, tmp_path / "out", "--cluster", str(CONFIG), "--expname", unique("alone"),
                        "--run_after", unique("nothing"), address=stub.base_url)
    assert "not waiting for it" in done.stderr
    [job] = re.findall(r"submitted job (\d+)", done.stdout)
    assert dependency_of(job) == "(null)"
    assert wait_for_job(job, timeout_s=60) == "COMPLETED"


def vllm_processes_of(job_id: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURM_JOB_ID") == job_id and "vllm" in " ".join(p.cmdline()).lower():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_job_with_its_own_vllm_server_answers_correctly_and_stops_it(demo_model, tmp_path):
    require_slurm()
    data, out = tmp_path / "arith.jsonl", tmp_path / "out"
    pairs = held_out_pairs()[:50]
    data.write_text("".join(json.dumps({"question": format_question(a, b), "a": a, "b": b}) + "\n"
                            for a, b in pairs))
    # the console command, as users type it
    argv = [str(Path(sys.executable).with_name("servegen")), "generate", "--cluster", str(CONFIG),
            "--input_file", str(data), "--output_dir", str(out), "--model", str(demo_model),
            "--server_type", "vllm", "--server_gpus", "0", "--expname", unique("vllm"),
            "++prompt_template=llama3-instruct", "++inference.tokens_to_generate=16"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")})  # sbatch passes it on
    assert done.returncode == 0, done.stderr
    [job] = re.findall(r"submitted job (\d+)", done.stdout)
    seen: set[int] = set()
    deadline = time.monotonic() + 600
    while job_states(job)[job] not in FINAL_STATES and time.monotonic() < deadline:
        seen |= {p.pid for p in vllm_processes_of(job)}
        time.sleep(1)
    log = (out / "logs" / f"{job}_0_log.out").read_text()
    assert wait_for_job(job, timeout_s=10) == "COMPLETED", log

    rows = read_jsonl(out / "output.jsonl")
    assert [(r["a"], r["b"]) for r in rows] == pairs
    correct = sum(r["generation"].strip() == f"{r['a']} + {r['b']} = {r['a'] + r['b']}." for r in rows)
    assert correct >= 0.95 * len(rows), [r["generation"] for r in rows]
    assert seen, "no vLLM process ran in the job"
    # the job body stopped its server itself, before the job ended; nothing of it is left
    assert "Application shutdown complete" in (out / "logs" / "vllm-server-1.log").read_text()
    assert vllm_processes_of(job) == []
    assert not [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert wait_for_sacct(job)[0] == "COMPLETED"
