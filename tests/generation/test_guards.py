"""The guards behind "a `.done` marker means the output is complete", each with a test that fails
when the guard goes: a client whose results end early leaves no `.done`, a crash at any file
operation never leaves a `.done` before its file and summary, and chunks merge in chunk order.
The job runs in this process (Job(...).run()) against the stub server."""

import contextlib
import json
import os
import pathlib
from pathlib import Path

import pytest
from job_helpers import BARE_TEMPLATE, JobStub, expected, once_each, read_jsonl, write_dataset

from servegen.generation import job as job_module
from servegen.generation.config import build_config
from servegen.generation.summary import summary_path
from servegen.inference.client import Client



def run_job(stub: JobStub, data: Path, out: Path, *overrides: str) -> int:
    return job_module.Job(build_config([
        f"++input_file={data}", f"++output_dir={out}", f"++server.address={stub.base_url}",
        "++server.model=stub-model", BARE_TEMPLATE, "++max_concurrent_requests=4", "++prompts_per_request=2",
        *overrides,
    ])).run()


def test_a_client_whose_results_end_early_leaves_no_done_marker_and_a_rerun_sends_only_the_missing_rows(
        stub, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 20)
    out = tmp_path / "out"
    output = out / "output.jsonl"
    real = Client.generate_iter_async

    async def ends_early(self, prompts, **kwargs):
        # the results of the first 17 prompts (in request order: rows 0-16 on a fresh run), then the end
        wanted = set(range(17))
        async with contextlib.aclosing(real(self, prompts, **kwargs)) as results:
            async for position, result in results:
                if position in wanted:
                    wanted.discard(position)
                    yield position, result
                if not wanted:
                    return

    monkeypatch.setattr(Client, "generate_iter_async", ends_early)
    with pytest.raises(RuntimeError, match="lacks rows from 17"):
        run_job(stub, data, out)
    assert not (out / "output.jsonl.done").exists()
    assert read_jsonl(output) == [expected(r) for r in rows[:17]]  # rows 17-19 lack

    monkeypatch.setattr(Client, "generate_iter_async", real)
    stub.reset()
    assert run_job(stub, data, out) == 0
    assert read_jsonl(output) == [expected(r) for r in rows]
    assert stub.requests == once_each(rows[17:])
    assert (out / "output.jsonl.done").exists() and summary_path(output).exists()


class Crash(Exception):
    """The process dies here (kill -9, a node lost): this file operation and every later one never happen."""


class CrashAt:
    """Makes the k-th write_text / unlink / os.replace under `root` (the job's output folder, its
    locks aside) raise Crash, and every one after it too; `calls` counts them."""

    def __init__(self, monkeypatch, root: Path):
        self.root = root
        self.k: int | None = None
        self.calls = 0
        real_write_text, real_unlink, real_replace = pathlib.Path.write_text, pathlib.Path.unlink, os.replace

        def step(path, what: str) -> None:
            path = Path(path)
            if self.k is None or not path.is_relative_to(self.root) or path.name.endswith(".lock"):
                return  # the output locks (lock.py): the kernel drops a dead process's; this one must release its own
            self.calls += 1
            if self.calls >= self.k:
                raise Crash(f"crash at file operation {self.calls}: {what} {path.name}")

        def write_text(path, *args, **kwargs):
            step(path, "write_text")
            return real_write_text(path, *args, **kwargs)

        def unlink(path, *args, **kwargs):
            step(path, "unlink")
            return real_unlink(path, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            step(dst, f"os.replace {Path(src).name} ->")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
        monkeypatch.setattr(pathlib.Path, "unlink", unlink)
        monkeypatch.setattr(os, "replace", replace)

    def arm(self, k: int | None) -> None:
        self.k, self.calls = k, 0


def assert_every_done_file_is_complete_with_its_summary(out: Path, expected_rows: dict[str, list[dict]]) -> None:
    for marker in sorted(out.glob("*.done")):
        target = marker.with_name(marker.name.removesuffix(".done"))
        assert target.exists(), f"{marker.name} without {target.name}"
        rows = expected_rows[target.name]
        assert read_jsonl(target) == [expected(r) for r in rows], f"{marker.name}: {target.name} is not complete"
        assert summary_path(target).exists(), f"{marker.name} without {summary_path(target).name}"
        assert json.loads(summary_path(target).read_text())["rows"] == len(rows)


def test_a_crash_at_any_file_operation_leaves_no_done_marker_before_its_file_and_summary(stub, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    rows = write_dataset(data, 9)
    expected_rows = {"output.jsonl": rows, **{f"output_chunk{c}.jsonl": rows[3 * c:3 * c + 3] for c in range(3)}}
    crash = CrashAt(monkeypatch, tmp_path / "runs")
    crashed_at = []
    for k in range(1, 100):
        out = tmp_path / "runs" / f"crash-at-{k}"
        stub.reset()
        crash.arm(k)
        try:
            run_job(stub, data, out, "++num_chunks=3")
        except Crash:
            crashed_at.append(k)
        else:
            assert crash.calls < k
            break
        finally:
            crash.arm(None)
        assert_every_done_file_is_complete_with_its_summary(out, expected_rows)

        assert run_job(stub, data, out, "++num_chunks=3") == 0  # no crash this time
        output = out / "output.jsonl"
        assert read_jsonl(output) == [expected(r) for r in rows], f"crash at {k}"
        assert (out / "output.jsonl.done").exists() and json.loads(summary_path(output).read_text())["rows"] == 9
        assert sorted(p.name for p in out.iterdir() if p.name != "logs") == [
            "output.jsonl", "output.jsonl.done", "output.summary.json"], f"crash at {k}: a clean-up left undone"
        assert stub.requests == once_each(rows), f"crash at {k}: rows sent again or never"
    else:
        pytest.fail("still crashing at file operation 99")
    # each chunk: side file removed, summary, .done; then the merge: os.replace, summary, .done, clean-up
    assert len(crashed_at) >= 3 * 3 + 3


def test_twelve_chunks_merge_in_chunk_order_not_file_name_order(stub, tmp_path):
    data = tmp_path / "data.jsonl"
    write_dataset(data, 30)
    run_job(stub, data, tmp_path / "whole")
    run_job(stub, data, tmp_path / "chunked", "++num_chunks=12")  # output_chunk10.jsonl sorts before _chunk2
    merged = tmp_path / "chunked" / "output.jsonl"
    assert (tmp_path / "chunked" / "output.jsonl.done").exists()
    assert [r["id"] for r in read_jsonl(merged)] == list(range(30))
    assert merged.read_bytes() == (tmp_path / "whole" / "output.jsonl").read_bytes()
