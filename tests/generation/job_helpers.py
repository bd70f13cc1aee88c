"""What the generation job tests share: datasets, the job's files read back, `servegen generate`
run as a real process, and the fault-injecting stub server with per-prompt delays, held prompts
and prompts that always fail."""

import asyncio
import collections
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# tests/ and tests/inference, also for the stub processes that import this module outside pytest
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "inference")]

from processes import as_a_shell_starts  # noqa: E402
from stub_server import StubServer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class JobStub(StubServer):
    """The stub server (whose `held` prompts get no answer until `release()`), plus:
    `delays[key]` seconds before answering that prompt, `failing` prompts answered 500 every
    time, and `finished`: the prompt keys in the order their answers were sent. A request with
    several prompts waits for the longest delay and any held prompt, and fails if one is failing."""

    def __init__(self):
        super().__init__()
        self.delays: dict[str, float] = {}
        self.failing: set[str] = set()
        self.finished: list[str] = []

    def reset(self) -> None:
        super().reset()
        self.delays.clear()
        self.failing.clear()
        self.finished.clear()

    def total_requests(self) -> int:
        return sum(self.requests.values())

    async def _answer(self, request, keys, fault, payload):
        # a request with several prompts: as slow as its slowest, failing if one of them does
        if any(key in self.failing for key in keys):
            fault = "500"
        delay = max(self.delays.get(key, 0.0) for key in keys)
        if delay:
            self.in_flight += 1  # a delayed request is in flight too
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(delay)
            finally:
                self.in_flight -= 1
        response = await super()._answer(request, keys, fault, payload)
        self.finished.extend(keys)
        return response


# string prompts that are the row's question as it is: the job batches string prompts (never chats)
BARE_TEMPLATE = f"++prompt_template={Path(__file__).parent / 'configs' / 'bare-template.yaml'}"


def expected(row: dict) -> dict:
    """What the job writes for an input row: the stub answers "reply to <question>" (3 tokens)."""
    return {**row, "num_generated_tokens": 3, "finish_reason": "stop", "generation": f"reply to {row['question']}"}


def once_each(rows) -> collections.Counter:
    return collections.Counter(r["question"] for r in rows)


def settle(stub: JobStub) -> None:
    """Wait until a stopped job's last requests have reached the stub and been answered."""
    last = -1
    while stub.total_requests() != last or stub.in_flight:
        last = stub.total_requests()
        time.sleep(0.3)


def write_dataset(path: Path, n: int, start: int = 0) -> list[dict]:
    """Rows with a `question` (the stub's prompt key: q<i>) and fields the job must keep as they are."""
    rows = [
        {"id": i, "question": f"q{i}", "meta": {"tags": ["a", i], "score": i / 4, "none": None}, "text": "ünïcødé ✓"}
        for i in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of a file (a kill may leave a half-written last one)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    return text.split("\n")[:-1]


def done_ids(out: Path) -> set[int]:
    """The ids of the rows a (killed) run finished: in the output or in its side file."""
    ids = {json.loads(line)["id"] for line in complete_lines(out)}
    side = out.with_name(out.name + ".unordered")
    ids |= {json.loads(line)["row"]["id"] for line in complete_lines(side)}
    return ids


def generate_argv(input_file: Path, output_dir: Path, *args: str, address: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "servegen.pipeline.generate", "--input_file", str(input_file),
            "--output_dir", str(output_dir)]
    if address:
        argv += ["--server_address", address]
    return argv + list(args)


def run_generate(input_file: Path, output_dir: Path, *args: str, address: str | None = None,
                 expect_rc: int | None = 0, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m servegen.pipeline.generate ...` to the end; its exit code must be `expect_rc`
    (None: any)."""
    argv = generate_argv(input_file, output_dir, *args, address=address)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=output_dir.parent,
                          env={**os.environ, **(env or {})})
    assert expect_rc is None or done.returncode == expect_rc, (
        f"exit code {done.returncode}, expected {expect_rc}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    )
    return done


def start_generate(input_file: Path, output_dir: Path, *args: str, address: str | None = None,
                   env: dict | None = None, background: bool = False) -> subprocess.Popen:
    """The same, in the background, in a session of its own (so that killpg reaches the job too);
    background: started as a shell starts `cmd &`, with SIGINT ignored."""
    argv = generate_argv(input_file, output_dir, *args, address=address)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=output_dir.parent,
                            start_new_session=True, env={**os.environ, **(env or {})},
                            preexec_fn=functools.partial(as_a_shell_starts, background))



@contextlib.contextmanager
def generating(input_file: Path, output_dir: Path, *args: str, address: str | None = None, env: dict | None = None,
               background: bool = False):
    """start_generate, and kill -9 whatever of it still runs when the block ends (a failed test)."""
    job = start_generate(input_file, output_dir, *args, address=address, env=env, background=background)
    try:
        yield job
    finally:
        if job.poll() is None:
            kill_group(job)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the job ended (code {proc.returncode}) before {what}\n{err[-5000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """kill -9 the pipeline and the job it runs, at once."""
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=60)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
