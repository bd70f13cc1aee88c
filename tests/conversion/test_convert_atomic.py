"""A conversion's output is never half there (docs/conversion.md): a local hf -> trtllm checkpoint
conversion (tp 2) killed with SIGKILL, or stopped with SIGTERM or Ctrl-C, at moments drawn over its
whole run; two conversions to one output at once; a --rerun_done killed midway. After each, the
output path holds nothing or a complete conversion, byte for byte an unkilled one's, and the next
run completes it."""

import hashlib
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import as_a_shell_starts, ended_by_default_action
from tiny_models import build_tiny_model

from servegen.cli import INTERRUPTED_EXIT_CODE
from servegen.conversion.check import MARKER

# the tiny Llama made wider (20 MB of float32), so that writing its rank files takes ~0.1 s
WIDER = dict(hidden_size=256, intermediate_size=1024, vocab_size=4001)
ARGS = ["--convert_from", "hf", "--convert_to", "trtllm", "--checkpoint_only", "--num_gpus", "2", "--dtype", "fp32"]
FIRST_STEP, CONVERTED = "servegen: step 1/", "servegen: converted "
STOPPED = "servegen: stopped"
STOPS_WITHIN_S = 5.0


class Running:
    """`python -m servegen.pipeline.convert` started as a shell starts it, in a process group of
    its own; its stderr read by a thread, line by line."""

    def __init__(self, model: Path, out: Path, *extra: str):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "servegen.pipeline.convert", "--input_model", str(model), "--output_model",
             str(out), *ARGS, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=as_a_shell_starts, start_new_session=True)
        self.err: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_line(self, prefix: str | None, timeout: float = 120) -> float | None:
        """Seconds from the start until a line beginning with `prefix` came; None once stderr ended
        (with prefix None: read to the end)."""
        while not self._ended:
            line = self._lines.get(timeout=timeout)
            if line is None:
                self._ended = True
                break
            self.err.append(line)
            if prefix is not None and line.startswith(prefix):
                return time.monotonic() - self.started
        return None

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """The exit code and the whole of stderr."""
        code = self.proc.wait(timeout=timeout)
        self.wait_line(None, timeout=10)
        return code, "".join(self.err)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@dataclass(frozen=True)
class Reference:
    """An unkilled conversion: its files, and its run in phases (the line each begins with, None for
    the start; how long it lasted): start-up and checks, the steps, the end after the rename."""

    digests: dict[str, str]
    phases: list[tuple[str | None, float]]


def state(out: Path, reference: Reference) -> str:
    """"absent" or "complete"; anything else at the output path fails the test."""
    if not out.exists():
        return "absent"
    assert digests(out) == reference.digests, f"{out} is neither absent nor the complete conversion"
    return "complete"


def beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def lock_of(out: Path) -> list[str]:
    """All that a finished or stopped conversion leaves beside its output (the reference run made the lock)."""
    return [f".{out.name}.servegen-lock"]


def completes(model: Path, out: Path, reference: Reference) -> None:
    code, err = Running(model, out).finish()
    assert code == 0, err
    assert state(out, reference) == "complete"
    assert beside(out) == lock_of(out)  # a killed run's partial folder is gone


def moments(rng: random.Random, phases: list[tuple[str | None, float]], counts: tuple[int, ...]):
    """counts[i] moments in phase i, one in each of as many equal slices of it: (the line the moment
    follows, seconds after it). Start-up is most of a run: drawn over the run alone, the moments
    would seldom fall while files are written."""
    return [(anchor, (i + rng.random()) * length / n) for (anchor, length), n in zip(phases, counts)
            for i in range(n)]


def signalled(model: Path, out: Path, moment: tuple[str | None, float], signum: int,
              *extra: str) -> tuple[int, str, float]:
    """A conversion sent `signum` at `moment`: its exit code, stderr, and seconds from the signal to its exit."""
    anchor, delay = moment
    run = Running(model, out, *extra)
    if anchor is None or run.wait_line(anchor) is not None:
        time.sleep(delay)  # the moment drawn: what is tested is what a signal then does
    sent = time.monotonic()
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signum)  # every process of the command, as Ctrl-C and scancel signal them
    code, err = run.finish()
    return code, err, time.monotonic() - sent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = build_tiny_model("llama-gqa", tmp_path_factory.mktemp("hf") / "llama", **WIDER)
    (path / "tokenizer.json").write_text("{}")  # copied beside the output, as a real tokenizer would be
    return path


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """Every test's output path: the marker names it, so that one reference holds byte for byte."""
    return tmp_path_factory.mktemp("models") / "llama-trt"


@pytest.fixture(scope="module")
def reference(model, place) -> Reference:
    run = Running(model, place)
    first, converted = run.wait_line(FIRST_STEP), run.wait_line(CONVERTED)
    code, err = run.finish()
    assert code == 0 and first is not None and converted is not None, err
    ended = time.monotonic() - run.started
    files = digests(place)
    assert {MARKER, "config.json", "rank0.safetensors", "rank1.safetensors", "tokenizer.json"} <= set(files)
    shutil.rmtree(place)
    return Reference(files, [(None, first), (FIRST_STEP, converted - first), (CONVERTED, ended - converted)])


@pytest.fixture
def out(place, reference) -> Path:
    shutil.rmtree(place, ignore_errors=True)
    return place


# moments in the start-up, the steps and the end of a run
TRIES = {signal.SIGKILL: (3, 5, 2), signal.SIGTERM: (2, 3, 1), signal.SIGINT: (2, 3, 1)}


@pytest.mark.parametrize("signum", TRIES, ids=lambda s: signal.Signals(s).name)
def test_a_conversion_killed_or_stopped_at_any_moment_leaves_nothing_or_its_complete_output(model, out, reference,
                                                                                            signum):
    rng = random.Random(13)
    in_the_steps = left_complete = 0
    for moment in moments(rng, reference.phases, TRIES[signum]):
        code, err, took = signalled(model, out, moment, signum)
        left = state(out, reference)
        why = f"at {moment}: exit code {code}\n{err}"
        if signum != signal.SIGKILL:
            assert took < STOPS_WITHIN_S, f"{took:.1f} s from the signal to the exit; {why}"
        if code == 0:  # the signal came after its exit
            assert CONVERTED in err and left == "complete", why
        elif signum == signal.SIGKILL:
            assert code == -signal.SIGKILL, why
        elif ended_by_default_action(code, err, signum):  # before servegen's first line: nothing was started
            assert moment[0] is None and left == "absent" and beside(out) == lock_of(out), why
        elif code == -signum and err.endswith(f" -> {out} (trtllm)\n"):
            # after the body returned: Python's finalization (~1 s with torch loaded) puts the
            # signals back to their default actions, and the output is complete already
            assert left == "complete", why
        else:
            assert code == INTERRUPTED_EXIT_CODE, why
            assert "Traceback" not in err and err.count(STOPPED) == 1 and err.rstrip().endswith(STOPPED), why
            assert beside(out) == lock_of(out), why  # a stop leaves no partial folder behind
        in_the_steps += FIRST_STEP in err and CONVERTED not in err
        left_complete += left == "complete"
        if left == "absent":
            completes(model, out, reference)
        shutil.rmtree(out, ignore_errors=True)
    # the moments fell both while the files were written and after the output was in place
    assert in_the_steps and left_complete, (in_the_steps, left_complete)


def test_of_two_conversions_to_one_output_at_once_one_converts_and_the_other_says_so(model, out, reference):
    locked = f"error: another conversion writes {out} now; wait for it\n"
    done = f"servegen: {out} is already converted; --rerun_done converts it again\n"
    # the first holds the lock, frozen in its first step (SIGSTOP) as a slow one would be
    first = Running(model, out)
    assert first.wait_line(FIRST_STEP) is not None, first.finish()
    os.kill(first.proc.pid, signal.SIGSTOP)
    try:
        second = Running(model, out).finish()
        assert not out.exists()
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    assert second == (2, locked)
    assert first.finish()[0] == 0 and state(out, reference) == "complete"
    assert Running(model, out).finish() == (0, done)
    # started at the same moment: the one that takes the lock converts, the other finds it taken
    # or (if it comes to the lock later) the output complete
    for _ in range(2):
        shutil.rmtree(out)
        results = [run.finish() for run in [Running(model, out), Running(model, out)]]
        converted = [(code, err) for code, err in results if CONVERTED in err]
        assert len(converted) == 1 and converted[0][0] == 0, results
        [other] = [result for result in results if result not in converted]
        assert other in ((2, locked), (0, done)), results
        assert state(out, reference) == "complete" and beside(out) == lock_of(out)


def test_a_rerun_done_killed_midway_leaves_the_old_output_in_place(model, out, reference):
    completes(model, out, reference)
    partial = out.parent / f".{out.name}.servegen-partial"
    rng = random.Random(14)
    old_kept_midway = 0
    for i, moment in enumerate(moments(rng, reference.phases, (2, 4, 2))):
        old = out.stat().st_ino
        signum = (signal.SIGKILL, signal.SIGTERM)[i % 2]
        code, err, _ = signalled(model, out, moment, signum, "--rerun_done")
        why = f"{signal.Signals(signum).name} at {moment}: exit code {code}\n{err}"
        assert state(out, reference) == "complete", why  # the old output or the new one, never none
        if partial.exists():  # killed while the new one was written
            assert out.stat().st_ino == old, why
        if code == INTERRUPTED_EXIT_CODE:
            assert beside(out) == lock_of(out), why  # neither the new one's partial folder nor the old one
        old_kept_midway += FIRST_STEP in err and out.stat().st_ino == old
    assert old_kept_midway
