"""Every input row exactly once, whatever is signalled or killed when: signals at random moments
(SIGTERM, Ctrl-C) always stop a job with exit code 130 and a rerun finishes the file; one writer
per output (a second run of the same command, or a rerun beside the orphan of a killed
`servegen generate`, is refused at once and writes nothing; a dead writer's lock is taken over);
bad text in the input or in a server's answer; a server address that refuses a connection for a
moment. Each property is tried many times at random moments against the stub server."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from job_helpers import (
    JobStub,
    complete_lines,
    done_ids,
    error_lines,
    expected,
    generating,
    read_jsonl,
    run_generate,
    settle,
    wait_for,
    write_dataset,
)
from processes import ended_by_default_action

from servegen.errors import ServegenError
from servegen.generation.lock import OutputBusy, OutputLock, lock_path

ROWS = 2000
# one prompt per request, 64 in flight, each answered after 0.2 s: a job of ~6 s, spending much of
# its time in the event loop's transport callbacks, where a signal used to be swallowed
SLOW = 0.2
ARGS = ["++max_concurrent_requests=64"]
SIGNAL_TRIES = 16
STOPS_WITHIN_S = 10.0  # from the signal to the exit, server-less job


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")  # shown with a failure
    return random.Random(seed)


def check_resumable(out: Path) -> set[int]:
    """The state a stopped job left: no .done, no row twice, the output a prefix in order; the
    rows done."""
    output = out / "output.jsonl"
    assert not (out / "output.jsonl.done").exists()
    prefix = [json.loads(line)["id"] for line in complete_lines(output)]
    assert prefix == list(range(len(prefix)))
    side = [json.loads(line)["row"]["id"] for line in complete_lines(out / "output.jsonl.unordered")]
    assert len(set(side)) == len(side)
    return set(prefix) | set(side)


def finish_and_check(stub: JobStub, data: Path, out: Path, rows: list[dict], done_before: set[int]) -> None:
    """A rerun sends only the rows not done and ends with every row once, in order."""
    settle(stub)
    stub.reset()
    stub.delay_s = 0.0
    run_generate(data, out, *ARGS, address=stub.base_url)
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    assert (out / "output.jsonl.done").exists()
    assert not (out / "output.jsonl.unordered").exists() and not lock_path(out / "output.jsonl").exists()
    resent = {key for key, n in stub.requests.items() if n}
    assert resent == {r["question"] for r in rows if r["id"] not in done_before}
    assert max(stub.requests.values(), default=1) == 1


def job_body(job: subprocess.Popen) -> psutil.Process:
    """The forked child of `servegen generate` that runs the job body."""
    deadline = time.monotonic() + 30
    while not (children := psutil.Process(job.pid).children()):
        assert time.monotonic() < deadline and job.poll() is None, "the job body never started"
        time.sleep(0.005)
    return children[0]


SIGNAL_OF = {"SIGTERM to servegen generate": signal.SIGTERM, "SIGTERM to every process": signal.SIGTERM,
             "Ctrl-C (SIGINT to every process)": signal.SIGINT, "SIGTERM to the job body": signal.SIGTERM}
HOW = {
    "SIGTERM to servegen generate": lambda job: os.kill(job.pid, signal.SIGTERM),
    # Slurm's scancel and time limit signal every process of the step; a terminal's Ctrl-C the foreground group
    "SIGTERM to every process": lambda job: os.killpg(job.pid, signal.SIGTERM),
    "Ctrl-C (SIGINT to every process)": lambda job: os.killpg(job.pid, signal.SIGINT),
    "SIGTERM to the job body": lambda job: job_body(job).send_signal(signal.SIGTERM),  # submitit's checkpoint
}


@pytest.mark.parametrize("how", list(HOW))
def test_a_signal_at_any_moment_stops_the_job_with_130_and_a_rerun_gives_every_row_once(stub, tmp_path, rng, how):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, ROWS)
    stopped_mid_run = before_our_code = 0
    for attempt in range(SIGNAL_TRIES):
        stub.reset()
        stub.delay_s = SLOW
        out = tmp_path / f"out{attempt}"
        with generating(data, out, *ARGS, address=stub.base_url) as job:
            if attempt % 2:  # a moment inside the run
                wait_for(lambda: complete_lines(out / "output.jsonl"), 60, "the first row", job)
                time.sleep(rng.uniform(0.0, 2.0))
            else:  # a moment of the start-up (or just after it)
                time.sleep(rng.uniform(0.0, 1.2))
            HOW[how](job)
            signalled = time.monotonic()
            _, err = job.communicate(timeout=60)
            took = time.monotonic() - signalled
        if not out.exists() and ended_by_default_action(job.returncode, err, SIGNAL_OF[how]):
            before_our_code += 1
            continue
        assert job.returncode == 130, f"try {attempt}: exit code {job.returncode}\n{err[-3000:]}"
        assert took < STOPS_WITHIN_S, f"try {attempt}: {took:.1f} s from the signal to the exit"
        assert "Traceback" not in err and "Fatal error" not in err, err[-3000:]
        assert err.rstrip().endswith("servegen: stopped") and err.count("servegen: stopped") == 1, err[-3000:]
        done = check_resumable(out)
        stopped_mid_run += 0 < len(done)
        finish_and_check(stub, data, out, rows, done)
    assert stopped_mid_run >= SIGNAL_TRIES // 2
    assert before_our_code <= SIGNAL_TRIES // 4


def test_a_background_job_started_with_sigint_ignored_keeps_ignoring_it_and_stops_on_sigterm(stub, tmp_path):
    """A shell starts `servegen generate ... &` with SIGINT ignored: Ctrl-C is not for it, at
    start-up or later (taking SIGINT over after start-up would make it work only sometimes);
    SIGTERM still stops it with 130."""
    data = tmp_path / "data.jsonl"
    write_dataset(data, ROWS)
    stub.delay_s = SLOW
    out = tmp_path / "out"
    with generating(data, out, *ARGS, address=stub.base_url, background=True) as job:
        for moment in (0.0, 0.3):  # in Python's start-up, then in the run
            time.sleep(moment)
            os.killpg(job.pid, signal.SIGINT)
        wait_for(lambda: complete_lines(out / "output.jsonl"), 60, "the first row", job)
        os.killpg(job.pid, signal.SIGINT)
        time.sleep(0.5)
        assert job.poll() is None  # still running
        os.killpg(job.pid, signal.SIGTERM)
        _, err = job.communicate(timeout=60)
    assert job.returncode == 130 and err.count("servegen: stopped") == 1, err[-3000:]
    settle(stub)


def test_a_killed_servegen_generate_leaves_no_writer_and_a_rerun_at_once_is_refused_until_it_is_gone(stub, tmp_path, rng):
    """kill -9 of `servegen generate` itself: its job body gets SIGTERM (it must not outlive its
    parent) and stops within seconds. Until then a rerun of the same command is refused at once
    with one line naming it: the body is stopped (SIGSTOP) as the parent dies, as a body slow to
    go (a loaded node, a slow disk) is, and resumed after the rerun."""
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, ROWS)
    host = socket.gethostname()
    held_lock = 0
    for attempt in range(10):
        stub.reset()
        stub.delay_s = SLOW
        out = tmp_path / f"out{attempt}"
        lock = lock_path(out / "output.jsonl")
        with generating(data, out, *ARGS, address=stub.base_url) as job:
            body = job_body(job)
            time.sleep(rng.uniform(0.0, 2.0))
            body.suspend()
            os.kill(job.pid, signal.SIGKILL)
            job.wait(timeout=60)  # its pipes stay open while the body lives
        try:
            if lock.exists() and json.loads(lock.read_text() or "{}").get("pid") == body.pid:
                held_lock += 1
                started = time.monotonic()
                again = run_generate(data, out, *ARGS, address=stub.base_url, expect_rc=2)
                assert time.monotonic() - started < 5, "a second writer must be refused at once"
                [line] = error_lines(again.stderr)
                assert re.fullmatch(
                    rf"error: {re.escape(str(out))}/output.jsonl is being written by another job \(pid {body.pid} on "
                    rf"host {re.escape(host)}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it to end or "
                    rf"stop it \(its lock: {re.escape(str(lock))}\)", line), line
        finally:
            body.resume()
        resumed = time.monotonic()
        while body.is_running() and body.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - resumed < STOPS_WITHIN_S, "the orphaned job body did not stop"
            time.sleep(0.05)
        job.communicate(timeout=60)
        if not (out / "output.jsonl.done").exists():
            finish_and_check(stub, data, out, rows, check_resumable(out))
        assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    assert held_lock >= 5  # most stops came after the body had locked its output


def test_the_same_command_twice_at_once_runs_once_and_the_other_is_refused_having_sent_and_written_nothing(
        stub, tmp_path, rng):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 600)  # ~2 s of work: the second one starts while the first runs
    for attempt in range(8):
        stub.reset()
        stub.delay_s = SLOW
        out = tmp_path / f"out{attempt}"
        with generating(data, out, *ARGS, address=stub.base_url) as first:
            time.sleep(rng.uniform(0.0, 1.5))
            second = run_generate(data, out, *ARGS, address=stub.base_url, expect_rc=None)
            _, first_err = first.communicate(timeout=120)
        codes = sorted([first.returncode, second.returncode])
        assert codes == [0, 2], f"try {attempt}: {first_err[-2000:]}\n{second.stderr[-2000:]}"
        refused = second.stderr if second.returncode else first_err
        [line] = error_lines(refused)
        assert "output.jsonl is being written by another job (pid " in line, line
        assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
        assert dict(stub.requests) == {r["question"]: 1 for r in rows}  # the refused one sent nothing


def test_a_refused_second_writer_changes_no_file(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 400)
    stub.held.add("q100")  # the first job waits there, its files still
    out = tmp_path / "out"
    args = ["++max_concurrent_requests=8", "++prompts_per_request=1"]
    with generating(data, out, *args, address=stub.base_url) as first:
        try:
            wait_for(lambda: len(done_ids(out / "output.jsonl")) == 100 + 4 * 8 - 1, 60, "the rows around row 100", first)
            before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
            asked = stub.total_requests()
            second = run_generate(data, out, *args, address=stub.base_url, expect_rc=2)
            assert "is being written by another job" in second.stderr
            assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
            assert stub.total_requests() == asked
        finally:
            stub.release()
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]


def test_the_lock_of_a_job_killed_with_kill_9_is_taken_over(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 300)
    stub.held.add("q50")
    out = tmp_path / "out"
    lock = lock_path(out / "output.jsonl")
    with generating(data, out, address=stub.base_url) as job:
        try:
            body = job_body(job)
            wait_for(lambda: lock.exists() and str(body.pid) in lock.read_text(), 60, "the lock", job)
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate(timeout=60)
        finally:
            stub.release()
    assert json.loads(lock.read_text())["pid"] == body.pid  # left behind by a dead process
    settle(stub)
    run_generate(data, out, address=stub.base_url)
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    assert not lock.exists()


def test_output_locks_in_one_process_one_holder_at_a_time(tmp_path):
    output = tmp_path / "output.jsonl"
    first = OutputLock(output)
    first.acquire()
    record = json.loads(lock_path(output).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(OutputBusy, match=rf"being written by another job \(pid {os.getpid()} on host "):
        OutputLock(output).acquire()
    first.release()
    assert not lock_path(output).exists()
    second = OutputLock(output)
    second.acquire()  # free again
    second.release()


def test_a_filesystem_that_refuses_locks_is_said_once_and_the_job_runs(tmp_path, monkeypatch, capfd):
    import errno
    import fcntl

    def refuse(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    lock = OutputLock(tmp_path / "output.jsonl")
    lock.acquire()
    lock.release()
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"servegen: warning: the filesystem of {tmp_path}/output.jsonl.lock refuses file locks")


BAD_ROW = '{"id": %d, "question": "q%d \\ud800 b"}'


def test_a_lone_surrogate_escape_in_a_row_is_a_bad_line_at_any_position(stub, tmp_path, rng):
    """Valid JSON, valid UTF-8, but no text: one error line naming it, exit code 2, the rows before
    it kept; fixed, the rerun finishes the file."""
    for attempt in range(10):
        data = tmp_path / f"data{attempt}.jsonl"
        rows = write_dataset(data, 200)
        lines = data.read_text(encoding="utf-8").splitlines()
        bad = rng.randrange(200)
        good, lines[bad] = lines[bad], BAD_ROW % (bad, bad)
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        stub.reset()
        for r in rows:
            stub.delays[r["question"]] = rng.uniform(0.0, 0.02)
        out = tmp_path / f"out{attempt}"
        done = run_generate(data, out, "++max_concurrent_requests=8", address=stub.base_url, expect_rc=2)
        column = lines[bad].index("\\ud800") + 1
        assert error_lines(done.stderr) == [
            f"error: {data}:{bad + 1}: \\ud800 at column {column} is half of a UTF-16 surrogate pair, not a character "
            "(rows before it are saved; fix the line and run again)"
        ], done.stderr
        assert "Traceback" not in done.stderr
        assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows[:bad]]
        lines[bad] = good
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        stub.reset()
        run_generate(data, out, "++max_concurrent_requests=8", address=stub.base_url)
        assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
        assert dict(stub.requests) == {r["question"]: 1 for r in rows[bad:]}
    stub.delays.clear()


def test_surrogate_pairs_in_a_row_and_lone_surrogates_in_an_answer_are_written_and_read_back(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": 0, "question": "q0 \\ud83d\\ude00"}\n{"id": 1, "question": "q1"}\n', encoding="utf-8")
    stub.replies["q1"] = "half \ud800 of a pair"  # the stub's JSON carries it as \ud800
    out = tmp_path / "out"
    run_generate(data, out, address=stub.base_url)
    first, second = [json.loads(line) for line in (out / "output.jsonl").read_text(encoding="utf-8").splitlines()]
    assert first["question"] == "q0 \U0001F600" and first["generation"] == "reply to q0 \U0001F600"
    assert second["generation"] == "half \ud800 of a pair"
    assert (out / "output.jsonl.done").exists()


def test_a_server_address_that_refuses_connections_for_a_moment_is_waited_for(tmp_path):
    """The job's check that a --server_address answers tries again for a while: one refused or
    reset connection is not a server gone."""
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    late = JobStub()
    with generating(data, out, "--model", "stub-model", address=f"http://127.0.0.1:{port}") as job:
        time.sleep(2.0)  # the job has started and found nothing there
        late.start(port)
        try:
            _, err = job.communicate(timeout=60)
        finally:
            late.stop()
    assert job.returncode == 0, err
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]


def test_results_of_an_earlier_job_in_the_input_are_replaced_by_this_jobs(stub, tmp_path):
    """A job's output fed to the next job (chained runs): every result field of the old row goes."""
    data = tmp_path / "data.jsonl"
    old = {"generation": "old", "num_generated_tokens": 99, "finish_reason": "error", "error": "old failure",
           "output": {"answer": 1}, "tokens": ["o"], "logprobs": [-1.0], "top_logprobs": [{"o": -1.0}]}
    rows = [{"id": i, "question": f"q{i}", **old, "kept": i} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for key, result in (("generation", "generation"), ("pred", "pred")):
        out = tmp_path / key
        run_generate(data, out, f"++generation_key={key}", address=stub.base_url)
        written = read_jsonl(out / "output.jsonl")
        assert written == [{"id": i, "question": f"q{i}", "kept": i, "num_generated_tokens": 3, "finish_reason": "stop",
                            result: f"reply to q{i}"} for i in range(10)]
        summary = json.loads((out / "output.summary.json").read_text())
        assert (summary["rows"], summary["failed_rows"], summary["generated_tokens"]) == (10, 0, 30)



def test_a_lock_that_cannot_be_created_is_one_clear_error(tmp_path, monkeypatch):
    """(These tests run as root, whom no folder's mode stops: the refusal is made here.)"""
    from servegen.generation import lock as lock_module

    def refuse(path, *args):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(lock_module.os, "open", refuse)
    with pytest.raises(ServegenError) as refused:
        OutputLock(tmp_path / "output.jsonl").acquire()
    assert str(refused.value) == f"cannot create {tmp_path}/output.jsonl.lock: Permission denied"
