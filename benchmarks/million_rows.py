"""A 1,000,000-row generation job against a stub server that answers instantly: rows/s, peak
RSS of the job's processes, and the time to resume after a kill -9 at 50%.

    .venv/bin/python benchmarks/million_rows.py [--rows 1000000]

The stub is benchmarks/client_overhead.py's raw-asyncio OpenAI stub (one process pinned to CPU
0). The job is `servegen generate --server_address <stub> ++prompt_template=llama3-instruct`
(string prompts, the whole job path: JSONL in, prompts built, requests, ordered output, .done,
summary). Peak RSS is the largest resident set among the job's processes (wait4's rusage).
Resume: a second, fresh run is killed with SIGKILL (its whole process group) once half the
rows are in its output; the same command is run again and timed until its first new row is
written ("resume") and until it is done; the final file must hold every row exactly once, in
order. Writes benchmarks/results/million_rows.json and prints a table next to the targets.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "million_rows.json"
TARGETS = {"peak_rss_mb": 300, "resume_s": 10}


def start_stub() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stub = subprocess.Popen([sys.executable, str(HERE / "client_overhead.py"), "--serve", str(port)],
                            stdout=subprocess.PIPE, text=True)
    assert stub.stdout.readline().strip() == "ready", "the stub did not start"
    return stub, f"http://127.0.0.1:{port}"


def job_command(data: Path, out: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "servegen.pipeline.generate", "--server_address", url, "--server_type", "vllm",
            "--model", "stub", "--input_file", str(data), "--output_dir", str(out),
            "++prompt_template=llama3-instruct", "++max_concurrent_requests=256"]


def run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command and every process it waited for."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"job failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.rows
    stub, url = start_stub()
    os.sched_setaffinity(0, {1})  # the job (and its children) on the other core
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            data = work / "input.jsonl"
            with open(data, "w") as f:
                for i in range(n):
                    f.write(json.dumps({"id": i, "question": f"What's {i % 100} + {i // 100 % 100}?"}) + "\n")

            wall, rss = run(job_command(data, work / "full", url))
            summary = json.loads((work / "full" / "output.summary.json").read_text())
            assert summary["rows"] == n, summary

            out = work / "resumed"
            victim = subprocess.Popen(job_command(data, out, url), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            while lines(out / "output.jsonl") < n // 2:
                time.sleep(0.05)
                assert victim.poll() is None, "the job ended before it could be killed"
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            at_kill = lines(out / "output.jsonl")

            started = time.perf_counter()
            again = subprocess.Popen(job_command(data, out, url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            resume_s = None
            while again.poll() is None:
                if resume_s is None and lines(out / "output.jsonl") > at_kill:
                    resume_s = time.perf_counter() - started
                time.sleep(0.02)
            finish_s = time.perf_counter() - started
            if again.returncode != 0:
                raise SystemExit(f"resumed job failed:\n{again.stderr.read().decode()[-3000:]}")
            ids = [json.loads(line)["id"] for line in open(out / "output.jsonl")]
            assert ids == list(range(n)), "the resumed output does not hold every row exactly once, in order"
    finally:
        stub.kill()
        stub.wait()

    result = {
        "rows": n,
        "wall_s": round(wall, 2),
        "rows_per_s": round(n / wall),
        "peak_rss_mb": round(rss, 1),
        "killed_at_rows": at_kill,
        "resume_s": round(resume_s, 2) if resume_s is not None else None,
        "resumed_run_total_s": round(finish_s, 2),
        "targets": TARGETS,
    }
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{n:,} rows through `servegen generate` against an instant stub (stub on CPU 0, job on CPU 1)")
    print(f"{'':34} {'servegen':>12} {'target':>10}")
    print(f"{'rows/s':34} {result['rows_per_s']:>12,}")
    print(f"{'peak RSS of the job, MB':34} {result['peak_rss_mb']:>12} {'< 300':>10}")
    print(f"{'resume after kill -9 at 50%, s':34} {result['resume_s']!s:>12} {'< 10':>10}")
    print(f"{'resumed run to the end, s':34} {result['resumed_run_total_s']:>12}")
    print(f"({RESULT})")


if __name__ == "__main__":
    main()
