"""`servegen generate` on this machine, as real processes against the fault-injecting stub server
(--server_address): output rows and order, .done and summary, kill -9 and resume exactly once,
chunks and merge, seeds, reruns, bad input lines, failed requests, config mistakes, the bound on
rows in memory, and the --dry_run commands and sbatch scripts (golden files)."""

import collections
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from job_helpers import (
    BARE_TEMPLATE,
    REPO,
    JobStub,
    complete_lines,
    done_ids,
    error_lines,
    expected,
    generating,
    kill_group,
    once_each,
    read_jsonl,
    run_generate,
    settle,
    wait_for,
    write_dataset,
)

from servegen.cluster import launch
from servegen.errors import ServerError
from servegen.generation import job as job_module
from servegen.generation.config import build_config
from servegen.generation.job import WINDOW_PER_REQUEST
from servegen.generation.outputs import units_of
from servegen.pipeline import generate
from servegen.server import process

SLURM_CONFIG = Path(__file__).parent / "configs" / "gen-slurm.yaml"


def summary_of(out: Path, name: str = "output") -> dict:
    return json.loads((out / f"{name}.summary.json").read_text())


def test_rows_keep_their_fields_in_input_order_with_done_marker_and_summary(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 60)
    rng = random.Random(1)
    for r in rows:  # answers in a shuffled order
        stub.delays[r["question"]] = rng.uniform(0.0, 0.1)
    out = tmp_path / "out"
    servegen = Path(sys.executable).parent / "servegen"
    started = time.monotonic()
    done = subprocess.run(
        [servegen, "generate", "--input_file", data, "--output_dir", out, "--server_address", stub.base_url,
         "++max_concurrent_requests=16"],
        capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr

    assert stub.finished != [r["question"] for r in rows], "the stub should have answered out of order"
    output = out / "output.jsonl"
    written = read_jsonl(output)
    assert written == [expected(r) for r in rows]
    assert list(written[0]) == [*rows[0], "num_generated_tokens", "finish_reason", "generation"]
    assert stub.requests == once_each(rows)
    assert stub.max_in_flight <= 16
    assert (out / "output.jsonl.done").exists()
    assert not (out / "output.jsonl.unordered").exists()

    summary = summary_of(out)
    assert summary["output"] == "output.jsonl"
    assert (summary["rows"], summary["failed_rows"], summary["generated_tokens"]) == (60, 0, 180)
    assert (summary["rows_in_run"], summary["failed_rows_in_run"], summary["generated_tokens_in_run"]) == (60, 0, 180)
    assert 0.1 <= summary["wall_time_s"] <= took
    assert summary["tokens_per_s"] == pytest.approx(180 / summary["wall_time_s"], rel=0.01)
    assert summary["rows_per_s"] == pytest.approx(60 / summary["wall_time_s"], rel=0.01)
    latency = summary["latency_s"]
    # delays are uniform in [0, 0.1] s (plus the machine's own time, which only adds)
    assert 0.03 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= summary["wall_time_s"] * 1.1
    assert latency["p90"] >= 0.08
    assert sum(summary["latency_histogram"].values()) == 60


@pytest.mark.parametrize("how", ["kill -9", "kill -9, half-written last lines", "SIGTERM"])
def test_a_killed_job_run_again_gives_the_same_file_and_resends_only_rows_not_done(stub, tmp_path, how):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 400)
    rng = random.Random(2)
    delays = {r["question"]: rng.uniform(0.0, 0.03) for r in rows}  # out of order: the side file is used
    args = ["++max_concurrent_requests=8", "++prompts_per_request=1"]
    reference = tmp_path / "reference"
    stub.delays.update(delays)
    run_generate(data, reference, *args, address=stub.base_url)

    stub.reset()
    stub.delays.update(delays)
    # row 100 gets no answer until the kill, so the kill lands mid-run however fast the machine:
    # rows 0-99 in the output, the rest of the window past row 100 in the side file, the others not sent
    stub.held.add("q100")
    done_at_kill = set(range(100 + WINDOW_PER_REQUEST * 8)) - {100}
    out = tmp_path / "out"
    output = out / "output.jsonl"
    with generating(data, out, *args, address=stub.base_url) as job:
        try:
            wait_for(lambda: done_ids(output) == done_at_kill, 60, "the rows around row 100", job)
            assert [json.loads(line)["id"] for line in complete_lines(output)] == list(range(100))  # the rest: side file
            if how == "SIGTERM":  # what Slurm sends at a time limit or preemption: stop cleanly
                job.send_signal(signal.SIGTERM)
                _, err = job.communicate(timeout=90)
                assert job.returncode == 130, err
            else:
                kill_group(job)
        finally:
            stub.release()
    settle(stub)
    finished = done_ids(output)
    assert finished == done_at_kill
    assert not (out / "output.jsonl.done").exists()
    if how == "kill -9, half-written last lines":
        with open(output, "a") as f:
            f.write('{"id": 1234, "question": "q12')
        with open(out / "output.jsonl.unordered", "a") as f:
            f.write('{"_servegen_row": 399, "row": {"id": 39')

    stub.reset()
    stub.delays.update(delays)
    run_generate(data, out, *args, address=stub.base_url)
    assert output.read_bytes() == (reference / "output.jsonl").read_bytes()
    assert [r["id"] for r in read_jsonl(output)] == list(range(400))  # every row once, no gap
    assert stub.requests == once_each(r for r in rows if r["id"] not in finished)
    assert (out / "output.jsonl.done").exists()
    assert not (out / "output.jsonl.unordered").exists()
    summary = summary_of(out)
    assert (summary["rows"], summary["rows_in_run"], summary["generated_tokens"]) == (400, 400 - len(finished), 1200)


def test_chunks_run_as_one_job_here_and_merge_into_the_same_file(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 100)
    run_generate(data, tmp_path / "reference", address=stub.base_url)
    stub.reset()

    out = tmp_path / "out"
    done = run_generate(data, out, "--num_chunks", "3", address=stub.base_url)
    assert (out / "output.jsonl").read_bytes() == (tmp_path / "reference" / "output.jsonl").read_bytes()
    assert stub.requests == once_each(rows)
    assert sorted(p.name for p in out.iterdir()) == ["output.jsonl", "output.jsonl.done", "output.summary.json"]
    assert "merged 3 chunks" in done.stderr
    summary = summary_of(out)
    assert (summary["chunks"], summary["rows"], summary["rows_in_run"], summary["generated_tokens"]) == (3, 100, 100, 300)
    assert summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0
    assert summary["latency_s"]["p50"] <= summary["latency_s"]["p99"]


def test_some_chunks_then_the_rest_the_last_one_merges(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 100)
    chunk = {0: rows[0:33], 1: rows[33:66], 2: rows[66:100]}  # contiguous: c * 100 // 3 ...
    out = tmp_path / "out"

    run_generate(data, out, "--num_chunks", "3", "--chunk_ids", "0,2", address=stub.base_url)
    assert stub.requests == once_each(chunk[0] + chunk[2])
    assert not (out / "output.jsonl").exists()
    for c in (0, 2):
        part = out / f"output_chunk{c}.jsonl"
        assert read_jsonl(part) == [expected(r) for r in chunk[c]]
        assert (out / f"output_chunk{c}.jsonl.done").exists()

    stub.reset()
    run_generate(data, out, "--num_chunks", "3", "--chunk_ids", "1", address=stub.base_url)
    assert stub.requests == once_each(chunk[1])
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    assert sorted(p.name for p in out.iterdir()) == ["output.jsonl", "output.jsonl.done", "output.summary.json"]
    summary = summary_of(out)
    assert (summary["chunks"], summary["rows"], summary["rows_in_run"]) == (3, 100, 100)

    stub.reset()
    run_generate(data, out, "--num_chunks", "3", address=stub.base_url)  # all merged: nothing to do
    assert stub.total_requests() == 0


def test_a_run_killed_between_its_chunks_done_marker_and_the_merge_merges_when_run_again(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 30)
    out = tmp_path / "out"
    run_generate(data, out, "--num_chunks", "2", "--chunk_ids", "0", address=stub.base_url)
    run_generate(data, tmp_path / "other", "--num_chunks", "2", "--chunk_ids", "1", address=stub.base_url)
    for name in ("output_chunk1.jsonl", "output_chunk1.jsonl.done", "output_chunk1.summary.json"):
        os.replace(tmp_path / "other" / name, out / name)  # both parts done, never merged
    stub.reset()
    run_generate(data, out, "--num_chunks", "2", address=stub.base_url)
    assert stub.total_requests() == 0
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    assert (out / "output.jsonl.done").exists()


def test_seeds_write_one_file_each_with_sampling_defaults(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 20)
    out = tmp_path / "out"
    run_generate(data, out, "--num_random_seeds", "2", "--num_chunks", "2", address=stub.base_url)
    assert sorted(p.name for p in out.iterdir()) == [
        "output-rs0.jsonl", "output-rs0.jsonl.done", "output-rs0.summary.json",
        "output-rs1.jsonl", "output-rs1.jsonl.done", "output-rs1.summary.json",
    ]  # fmt: skip
    for seed in (0, 1):
        assert read_jsonl(out / f"output-rs{seed}.jsonl") == [expected(r) for r in rows]
    sent = collections.Counter((b["messages"][-1]["content"], b["seed"]) for b in stub.bodies)
    assert sent == collections.Counter({(r["question"], seed): 1 for r in rows for seed in (0, 1)})
    assert {(b["temperature"], b["top_p"]) for b in stub.bodies} == {(0.7, 0.95)}

    stub.reset()
    out = tmp_path / "out2"
    run_generate(data, out, "--random_seeds", "0,5,7", "++inference.temperature=0.3", address=stub.base_url)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["output-rs0.jsonl", "output-rs5.jsonl", "output-rs7.jsonl"]
    assert collections.Counter(b["seed"] for b in stub.bodies) == {0: 20, 5: 20, 7: 20}
    assert {(b["temperature"], b["top_p"]) for b in stub.bodies} == {(0.3, 0.95)}

    stub.reset()
    run_generate(data, tmp_path / "out3", "++random_seeds=[3]", "++inference.top_p=0.5", address=stub.base_url)
    assert {(b["seed"], b["temperature"], b["top_p"]) for b in stub.bodies} == {(3, 0.7, 0.5)}

    stub.reset()
    run_generate(data, tmp_path / "out4", address=stub.base_url)  # no seeds: greedy, no seed sent
    # top_p 1.0 as the Python API sends it (the job used to send 0.95)
    assert {(b.get("seed"), b["temperature"], b["top_p"]) for b in stub.bodies} == {(None, 0.0, 1.0)}


def test_a_finished_job_sends_nothing_and_rerun_done_runs_it_again(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 25)
    out = tmp_path / "out"
    output = out / "output.jsonl"
    run_generate(data, out, address=stub.base_url)
    before = (output.read_bytes(), output.stat().st_mtime_ns)

    stub.reset()
    done = run_generate(data, out, address=stub.base_url)
    assert stub.total_requests() == 0
    assert "every output of this job is done" in done.stderr
    assert (output.read_bytes(), output.stat().st_mtime_ns) == before

    stub.reset()
    run_generate(data, out, "--rerun_done", address=stub.base_url)
    assert stub.requests == once_each(rows)
    assert output.read_bytes() == before[0]
    assert (out / "output.jsonl.done").exists()


BAD_LINES = {
    "malformed JSON": (b'{"id": 40, "question": "q40", "meta": ', "not valid JSON"),
    "missing field": (b'{"id": 40, "text": "no question here"}', "needs field 'question'"),
    "non-UTF-8": (b'{"id": 40, "question": "q40 \xff\xfe"}', "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_bad_input_line_is_one_error_naming_it_and_the_rows_before_it_are_kept(stub, tmp_path, kind):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 80)
    lines = data.read_bytes().split(b"\n")[:-1]
    lines.insert(10, b"")  # a blank line: not a row, but it counts as a line; row 40 is on line 42
    bad, what = BAD_LINES[kind]
    good = lines[41]
    lines[41] = bad
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    output = out / "output.jsonl"

    done = run_generate(data, out, "++max_concurrent_requests=4", address=stub.base_url, expect_rc=2)
    assert error_lines(done.stderr) == [done.stderr.strip().splitlines()[-1]]
    message = error_lines(done.stderr)[0]
    assert message.startswith(f"error: {data}:42: ") and what in message, message
    assert "Traceback" not in done.stderr
    assert stub.requests == once_each(rows[:40])  # nothing for the bad row or after it
    assert read_jsonl(output) == [expected(r) for r in rows[:40]]  # the rows before it, saved in order
    assert not (out / "output.jsonl.done").exists()

    lines[41] = good
    data.write_bytes(b"\n".join(lines) + b"\n")
    stub.reset()
    run_generate(data, out, "++max_concurrent_requests=4", address=stub.base_url)
    assert stub.requests == once_each(rows[40:])
    assert read_jsonl(output) == [expected(r) for r in rows]
    assert (out / "output.jsonl.done").exists()


def closed_port_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: nothing listens


def test_a_server_address_where_nothing_answers_is_one_clear_error_before_any_row(tmp_path):
    data = tmp_path / "data.jsonl"
    write_dataset(data, 5)
    out = tmp_path / "out"
    address = closed_port_address()
    done = run_generate(data, out, "--model", "m", address=address, expect_rc=2)
    assert error_lines(done.stderr) == [
        f"error: nothing answers at {address}: start the server first (servegen start_server) or fix --server_address"
    ]
    assert not (out / "output.jsonl").exists() and not (out / "output.jsonl.done").exists()


@pytest.mark.parametrize("soft_fail", ["true", "false"])
def test_a_server_whose_model_list_fails_is_one_error_that_says_to_pass_model(stub, tmp_path, soft_fail):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 5)
    out = tmp_path / "out"
    stub.models_status = 500
    try:
        done = run_generate(data, out, f"++soft_fail={soft_fail}", "++inference.max_retries=0",
                            address=stub.base_url, expect_rc=2)
        [line] = error_lines(done.stderr)
        assert line.startswith(f"error: cannot find out which model the server at {stub.base_url} serves (")
        assert "HTTP 500" in line and line.endswith("); pass --model with the name it serves"), line
        assert stub.total_requests() == 0 and not (out / "output.jsonl.done").exists()
        run_generate(data, out, "--model", "stub-model", f"++soft_fail={soft_fail}", address=stub.base_url)
    finally:
        stub.models_status = 200
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]


@pytest.mark.parametrize("soft_fail", ["true", "false"])
def test_a_server_that_goes_away_mid_job_stops_it_and_a_rerun_resumes(tmp_path, soft_fail):
    """Requests that fail because the server is gone are not written as failed rows: the job
    stops, keeps what is done, and the same command against a server again finishes the file."""
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 100)
    first = JobStub().start()
    first.delay_s = 0.1  # 100 rows, 2 at a time: 5 s
    first.held.add("q50")  # never answered: the job cannot finish on this server however fast the machine
    args = ["--model", "m", "++max_concurrent_requests=2", "++prompts_per_request=1", "++inference.max_retries=1",
            "++inference.retry_backoff=0.01", f"++soft_fail={soft_fail}", BARE_TEMPLATE]
    out = tmp_path / "out"
    output = out / "output.jsonl"
    try:
        with generating(data, out, *args, address=first.base_url) as job:
            wait_for(lambda: len(complete_lines(output)) >= 5, 60, "five rows", job)
            first.stop()
            _, err = job.communicate(timeout=60)
        assert job.returncode == 2, err
        [message] = error_lines(err)
        assert message.startswith(f"error: the server at {first.base_url} stopped answering (") and message.endswith(
            f"cannot connect to 127.0.0.1:{first.port}: Connection refused); the rows done are kept in {output}: "
            "run the job again to resume"
        ), message
    finally:
        first.stop()
    kept = read_jsonl(output)
    assert 5 <= len(kept) <= 50 and kept == [expected(r) for r in rows[:len(kept)]]  # no row with an error
    assert not (out / "output.jsonl.done").exists()

    second = JobStub().start()
    try:
        run_generate(data, out, *args, address=second.base_url)
    finally:
        second.stop()
    assert read_jsonl(output) == [expected(r) for r in rows]
    assert not set(second.requests) & {r["question"] for r in kept}
    assert (out / "output.jsonl.done").exists()


def test_requests_that_fail_for_good_give_rows_with_an_error_counted_in_the_summary(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 20)
    stub.failing = {"q3", "q7"}
    retries = ["++inference.max_retries=1", "++inference.retry_backoff=0.01", "++max_concurrent_requests=4"]
    out = tmp_path / "out"
    run_generate(data, out, *retries, address=stub.base_url)
    written = read_jsonl(out / "output.jsonl")
    assert [r["id"] for r in written] == list(range(20))
    for r in written:
        if r["question"] in stub.failing:
            assert (r["generation"], r["finish_reason"], r["num_generated_tokens"]) == (None, "error", 0)
            assert "failed 2 times" in r["error"] and "HTTP 500" in r["error"], r["error"]
            assert stub.requests[r["question"]] == 2  # one try and one retry
        else:
            assert r == expected(rows[r["id"]])
    summary = summary_of(out)
    assert (summary["rows"], summary["failed_rows"], summary["generated_tokens"]) == (20, 2, 18 * 3)
    assert summary["failed_rows_in_run"] == 2
    assert (out / "output.jsonl.done").exists()

    # ++soft_fail=false: the job stops at the first failure, naming its input line
    out = tmp_path / "strict"
    done = run_generate(data, out, *retries, "++soft_fail=false", address=stub.base_url, expect_rc=2)
    [message] = error_lines(done.stderr)
    assert message.startswith((f"error: {data}:4: ", f"error: {data}:8: ")) and "HTTP 500" in message, message
    assert not (out / "output.jsonl.done").exists()


def test_string_prompts_go_several_per_request_and_give_the_same_file(stub, tmp_path):
    """vLLM's default: string prompts (a template) with equal parameters share requests; the output
    is the one one prompt per request gives: every row its own generation and token count, in
    order, and a row the server rejects fails alone."""
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 300)
    rows[40]["question"] = "q40 TOO_LONG"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for i in range(0, 300, 7):
        stub.replies[f"q{i}"] = " ".join(["w"] * (i % 5 + 1))
    outputs = {}
    for per_request in (None, 1):
        stub.reset()
        out = tmp_path / f"out-{per_request}"
        extra = [] if per_request is None else [f"++prompts_per_request={per_request}"]
        run_generate(data, out, BARE_TEMPLATE, "++max_concurrent_requests=4", *extra, address=stub.base_url)
        outputs[per_request] = read_jsonl(out / "output.jsonl")
        sizes = stub.batch_sizes
        if per_request is None:  # 16 (300 = 18 x 16 + 12), and the request with the rejected row again prompt by prompt
            assert sorted(sizes) == [1] * 16 + [12] + [16] * 18
        else:
            assert sizes == [1] * 300
        summary = summary_of(out)
        assert (summary["rows"], summary["failed_rows"]) == (300, 1)
    assert outputs[None] == outputs[1]
    for row, written in zip(rows, outputs[None]):
        if row["id"] == 40:
            assert written["finish_reason"] == "error" and "maximum context length" in written["error"]
            continue
        text = stub.replies.get(row["question"], f"reply to {row['question']}")
        assert written == {**row, "num_generated_tokens": len(text.split()), "finish_reason": "stop", "generation": text}


@pytest.mark.parametrize("tokens, extra, size", [(128, [], 64), (129, [], 16), (32, ["++prompts_per_request=16"], 16)])
def test_short_generations_go_64_per_request_with_64_requests_in_flight(stub, tmp_path, tokens, extra, size):
    """At most SHORT_GENERATION tokens, with neither setting given: 64 prompts per request, 64
    requests in flight; longer ones (or a prompts_per_request given): the client's 16 x 64."""
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 4160)
    stub.delay_s = 1.0  # the whole first wave of requests is still in flight when its last one is sent
    out = tmp_path / "out"
    run_generate(data, out, BARE_TEMPLATE, f"++inference.tokens_to_generate={tokens}", *extra, address=stub.base_url)
    assert job_module.SHORT_GENERATION == 128
    assert stub.batch_sizes == [size] * (4160 // size)
    assert stub.max_in_flight == 64
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]


@pytest.mark.parametrize(
    "args, message",
    [
        (["++inference.temprature=0.5"], "override inference.temprature=0.5: no such key in the generation config"),
        (["++bogus=1"], "override bogus=1: no such key"),
        (["++max_concurrent_requests=many"], "override max_concurrent_requests='many'"),
        (["++max_concurrent_requests=0"], "max_concurrent_requests must be an integer >= 1"),
        (["++prompts_per_request=0"], "prompts_per_request must be an integer >= 1 or None"),
        (["--server_type", "hf", "++prompts_per_request=4", "++prompt_template=llama3-instruct"],
         "server_type hf cannot take several prompts per request"),
        (["++prompts_per_request=4"], "++prompts_per_request needs string prompts (a ++prompt_template)"),
        (["++inference.temperature=-1"], "temperature must be a number >= 0"),
        (["++prompt_template=no-such-template"], "unknown prompt template 'no-such-template'"),
        (["--server_gpus", "1"], "--server_address uses a running server; --server_gpus"),
        (["--server_nodes", "2"], "--server_address uses a running server; --server_nodes"),
        (["--random_seeds", "0,1", "--num_random_seeds", "2"], "give --random_seeds or --num_random_seeds, not both"),
        (["--starting_seed", "3"], "--starting_seed is the first seed of --num_random_seeds"),
        (["--random_seeds", "a,b"], "--random_seeds must look like 0,3,5 or 0-2"),
        (["--chunk_ids", "1"], "--chunk_ids needs --num_chunks 2 or more"),
        (["--num_chunks", "3", "--chunk_ids", "1,3"], "--chunk_ids [3] are outside 0..2 (--num_chunks 3)"),
        (["--num_chunks", "0"], "--num_chunks must be 1 or more"),
        (["--dependent_jobs", "1"], "--dependent_jobs and --run_after need a Slurm cluster"),
    ],
)
def test_config_mistakes_and_bad_flag_combinations_are_one_clear_error(stub, tmp_path, capsys, args, message):
    data = tmp_path / "data.jsonl"
    write_dataset(data, 3)
    argv = ["--input_file", str(data), "--output_dir", str(tmp_path / "out"), "--server_address", stub.base_url]
    assert generate.main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert stub.total_requests() == 0


def test_a_mistake_is_one_line_from_the_command_too(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    write_dataset(data, 3)
    done = run_generate(data, tmp_path / "out", "++inference.temprature=0.5", address=stub.base_url, expect_rc=2)
    assert done.stderr == "error: override inference.temprature=0.5: no such key in the generation config " \
                          "(see docs/generation.md)\n"
    done = run_generate(data, tmp_path / "out", expect_rc=2)  # no server at all
    assert done.stderr.startswith("error: give --model, --server_type and --server_gpus to start a server")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("concurrency, per_request, n", [(4, 1, 500), (256, 1, 4000), (4, 16, 1000), (64, 16, 8000)])
def test_dispatch_stops_a_window_past_a_row_that_does_not_finish(stub, tmp_path, concurrency, per_request, n):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, n)
    window = WINDOW_PER_REQUEST * concurrency * per_request
    stub.held.add("q0")  # and with it the request that carries it: rows 0 .. per_request-1
    out = tmp_path / "out"
    side = out / "output.jsonl.unordered"
    args = [f"++max_concurrent_requests={concurrency}", f"++prompts_per_request={per_request}", BARE_TEMPLATE]
    with generating(data, out, *args, address=stub.base_url) as job:
        try:
            wait_for(lambda: len(complete_lines(side)) >= window - per_request, 60, "the rows after the held ones", job)
            time.sleep(0.5)  # a dispatcher that ignored the window would send more meanwhile
            assert stub.total_requests() == window
            assert stub.requests == once_each(rows[:window])
            assert stub.batch_sizes == [per_request] * (window // per_request)
            assert stub.in_flight == 1
            assert complete_lines(out / "output.jsonl") == []  # row 0 is not done: nothing in order yet
            assert not (out / "output.jsonl.done").exists()
        finally:
            stub.release()
        _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert stub.requests == once_each(rows)
    assert stub.max_in_flight <= concurrency
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    assert not side.exists()


DRY_RUNS = {
    "local-single-job.txt": [
        "--model", "/models/llama-3-8b-instruct", "--server_type", "vllm", "--server_gpus", "1",
        "++prompt_template=llama3-instruct", "++inference.tokens_to_generate=1024",
    ],
    "slurm-single-job-8-gpus.txt": [
        "--cluster", str(SLURM_CONFIG), "--model", "/models/llama-3-70b-instruct", "--server_type", "vllm",
        "--server_gpus", "8", "--server_args", "--max-model-len 8192", "++prompt_template=llama3-instruct",
        "++stop_phrases=[\"</answer>\"]",
    ],
    "slurm-2-node-server.txt": [
        "--cluster", str(SLURM_CONFIG), "--model", "/models/deepseek-v3", "--server_type", "sglang",
        "--server_gpus", "8", "--server_nodes", "2", "--expname", "dsv3", "++max_concurrent_requests=1024",
    ],
    "slurm-4-chunk-array.txt": [
        "--cluster", str(SLURM_CONFIG), "--model", "/models/llama-3-8b-instruct", "--server_type", "vllm",
        "--server_gpus", "1", "--num_chunks", "4", "--partition", "debug",
    ],
    "slurm-3-seeds-2-chunks.txt": [
        "--cluster", str(SLURM_CONFIG), "--model", "/models/qwen", "--server_type", "vllm", "--server_gpus", "2",
        "--num_random_seeds", "3", "--num_chunks", "2", "++prompt_template=qwen",
    ],
    "slurm-dependent-jobs.txt": [
        "--cluster", str(SLURM_CONFIG), "--server_address", "http://inference-host:8000", "--model", "served-name",
        "--dependent_jobs", "2", "--time_limit", "02:00:00", "--time_min", "01:00:00",
    ],
}


def test_the_printed_job_command_keeps_every_override_typed_even_one_equal_to_its_default(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_dataset(data, 3)
    argv = ["--input_file", str(data), "--output_dir", str(tmp_path / "out"), "--server_address", "http://h:1",
            "++inference.temperature=0", "++soft_fail=true", "++inference.top_p=0.5", "--dry_run"]
    assert generate.main(argv) == 0
    [command] = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    words = shlex.split(command)
    assert {"++inference.temperature=0.0", "++soft_fail=true", "++inference.top_p=0.5"} <= set(words)
    assert "++inference.top_k=-1" not in words  # not typed, the default: left out


TASKS = {  # (seed, chunk) of each Slurm task, job after job
    "slurm-single-job-8-gpus.txt": [(None, None)],
    "slurm-2-node-server.txt": [(None, None)],
    "slurm-4-chunk-array.txt": [(None, c) for c in range(4)],
    "slurm-3-seeds-2-chunks.txt": [(seed, c) for seed in range(3) for c in range(2)],
    "slurm-dependent-jobs.txt": [(None, None)] * 3,
}


@pytest.mark.parametrize("name", list(DRY_RUNS))
def test_dry_run_prints_the_commands_and_sbatch_scripts(name, tmp_path, monkeypatch, capsys, golden):
    for var in ("SERVEGEN_CONFIG_DIR", "HF_HOME", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    write_dataset(data, 10)
    out = tmp_path / "out"
    assert generate.main(["--input_file", str(data), "--output_dir", str(out), *DRY_RUNS[name], "--dry_run"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    text = captured.out.replace(sys.executable, "<python>").replace(str(tmp_path), "<tmp>").replace(str(REPO), "<repo>")
    golden(name, text)
    assert not out.exists()  # a dry run writes nothing

    if name in TASKS:  # the job config each Slurm task rebuilds from its ++overrides: one output each
        runs = [shlex.split(line.split(" runs: ", 1)[1]) for line in captured.out.splitlines() if line.startswith(("# array task ", "# the job runs: "))]
        units = [units_of(build_config([a for a in argv if a.startswith("++")])) for argv in runs]
        assert [(u.seed, u.chunk) for [u] in units] == TASKS[name]


class StandInServer:
    """A co-located 'server' for the restart tests: a `sleep` process standing in front of the stub
    (which answers the requests and the readiness probe); killing it is the server dying."""

    health_method, health_body = "GET", None

    def __init__(self, started: list, stub: JobStub):
        self.proc = subprocess.Popen(["sleep", "600"])
        self.pid = self.proc.pid
        self.health_url = f"{stub.base_url}/health"
        started.append(self)

    def wait_ready(self, timeout_s: float) -> None:
        pass

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("per_request", [1, 16])
def test_the_job_restarts_its_server_when_it_dies_and_gives_up_after_max_restarts(stub, tmp_path, monkeypatch, per_request):
    started: list[StandInServer] = []
    monkeypatch.setattr(launch, "start_server_here", lambda spec, cluster, log_path, name: StandInServer(started, stub))
    monkeypatch.setattr(process, "free_port", lambda: stub.port)
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 40)
    out = tmp_path / "out"
    output = out / "output.jsonl"
    stub.held.add("q5")  # in flight when the server dies
    overrides = [f"++input_file={data}", f"++output_dir={out}", "++server.model=stub-model", "++max_concurrent_requests=4",
                 f"++prompts_per_request={per_request}", BARE_TEMPLATE]
    errors = []

    def run(extra):
        try:
            job_module.Job(build_config(overrides + extra)).run()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=run, args=(["++server.max_restarts=1"],))
    thread.start()
    window = WINDOW_PER_REQUEST * 4 * per_request
    # dispatch stops a window past the held row: rows 0-4 in the output, 6..5+window-1 in the side file;
    # with 16 rows per request the window passes the end, and rows 0-15 wait with the held one
    held = {5} if per_request == 1 else set(range(16))
    wait_for(lambda: done_ids(output) == set(range(min(5 + window, 40))) - held, 60, "every row the window lets through")
    started[0].proc.kill()
    wait_for(lambda: stub.requests["q5"] == 2, 60, "the held row sent again to the restarted server")
    stub.release()
    thread.join(60)
    assert not errors and len(started) == 2
    assert read_jsonl(output) == [expected(r) for r in rows]
    # done rows were not sent again
    assert stub.requests == once_each(rows) + collections.Counter(f"q{i}" for i in held)
    assert all(s.proc.poll() is not None for s in started)  # each stopped

    # a server that dies once more than ++server.max_restarts allows ends the job, rows kept
    stub.reset()
    stub.held.add("q5")
    started.clear()
    out = tmp_path / "out2"
    overrides[1] = f"++output_dir={out}"
    thread = threading.Thread(target=run, args=(["++server.max_restarts=1"],))
    thread.start()
    for kill in range(2):
        wait_for(lambda: stub.requests["q5"] == kill + 1 and len(started) == kill + 1, 60, f"start {kill + 1}")
        started[kill].proc.kill()
    thread.join(60)
    assert len(started) == 2
    [error] = errors
    assert isinstance(error, ServerError)
    assert str(error) == (f"the server exited with code -9 (log {out}/logs/vllm-server-2.log); "
                          "it was restarted 1 time(s) already, as many as ++server.max_restarts allows")
    assert [r["id"] for r in read_jsonl(out / "output.jsonl")] == sorted(set(range(5)) - held)
    assert not (out / "output.jsonl.done").exists()
    stub.release()


STUB_PROCESS = Path(__file__).parent / "stub_process.py"


def stub_process_servers(monkeypatch, started: list, *args: str) -> None:
    """Co-located servers that are real processes: the stub server on the job's port
    (tests/generation/stub_process.py ARGS), probed at /health."""

    def start(spec, cluster, log_path, name):
        server = process.ServerProcess([sys.executable, str(STUB_PROCESS), str(spec.port), *args], dict(os.environ),
                                       log_path, f"http://127.0.0.1:{spec.port}/health", name=name).start()
        started.append(server)
        return server

    monkeypatch.setattr(launch, "start_server_here", start)


@pytest.mark.parametrize("hang", ["SIGSTOP", "an engine that stops answering behind a live /health"])
def test_a_server_that_hangs_alive_is_restarted_and_the_job_finishes_every_row_once(tmp_path, monkeypatch, capfd, hang):
    started: list[process.ServerProcess] = []
    # each answer after 0.05 s; with the engine hanging: none after the 40th answer of each server
    stub_process_servers(monkeypatch, started, "0.05", *(["40"] if hang != "SIGSTOP" else []))
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 60)
    out = tmp_path / "out"
    overrides = [f"++input_file={data}", f"++output_dir={out}", "++server.model=stub-model", "++max_concurrent_requests=4",
                 "++prompts_per_request=1", BARE_TEMPLATE, "++server.hang_timeout=2", "++inference.timeout=2",
                 "++server.max_restarts=1"]
    errors = []

    def run():
        try:
            job_module.Job(build_config(overrides)).run()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        if hang == "SIGSTOP":
            wait_for(lambda: len(complete_lines(out / "output.jsonl")) >= 10, 60, "ten rows")
            os.kill(started[0].pid, signal.SIGSTOP)
        thread.join(60)
    finally:
        for server in started:
            server.stop()
    assert not thread.is_alive() and not errors, errors
    assert len(started) == 2
    assert started[0].proc.returncode is not None  # stopped, SIGSTOP or not
    assert read_jsonl(out / "output.jsonl") == [expected(r) for r in rows]
    why = {"SIGSTOP": "it answered neither its readiness probe nor a request for 2 s (++server.hang_timeout)",
           "an engine that stops answering behind a live /health":
               "it finished none of the requests in flight for 2 s (++server.hang_timeout, or the request timeout "
               "if longer)"}[hang]
    restarted = [line for line in capfd.readouterr().err.splitlines() if "restarting it" in line]
    assert restarted == [f"servegen: the server hangs: {why} (log {out}/logs/vllm-server-1.log); restarting it"]


def test_an_output_longer_than_the_input_is_an_error_not_a_done_file(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "output.jsonl").write_text("".join(json.dumps(expected(r)) + "\n" for r in rows))
    write_dataset(data, 5)  # the input changed under an unfinished output
    done = run_generate(data, out, address=stub.base_url, expect_rc=2)
    assert error_lines(done.stderr) == [
        f"error: {out}/output.jsonl has more rows than rows 0..4 of {data}: did the input change? (--rerun_done starts over)"
    ]
    assert stub.total_requests() == 0
    assert not (out / "output.jsonl.done").exists()
