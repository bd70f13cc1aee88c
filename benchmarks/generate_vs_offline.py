"""End-to-end tokens/s of `servegen generate` against a running vLLM CPU server, side by side
with vLLM's own offline `LLM.generate` on the same prompts, model, engine flags and sampling.

    .venv/bin/python benchmarks/generate_vs_offline.py [--rows 20000] [--rounds 5] [--job_args '++k=v ...']

Both sides run on servegen's demo model (built if needed), greedy, at most 32 new tokens, with
the CPU engine flags servegen uses (float32, eager, 0.5 memory utilization, max_model_len 512)
and the same engine settings where vLLM's defaults differ between its offline engine and its API
server: on CPU 256 sequences and 4096 batched tokens against 128 and 2048, and no statistics
against per-step statistics for its log and /metrics; both sides get the offline defaults
(`--engine_limits vllm-defaults` leaves each side its own).
Offline: one process loads vllm.LLM, warms up, and times LLM.generate calls over every prompt.
servegen: one vLLM server started with `servegen start_server`, warmed up, then the wall time
of the whole `servegen generate` process (its start, reading the JSONL, building prompts with
the llama3-instruct template, requests, writing the output) is timed, with the job's default
concurrency and prompts per request; the job's own rate (its summary: from its first request
to its last row, without the start-up of its process) is shown next to it. Both stay up,
and the rounds alternate between them, so that load from other work on the machine hits both
alike; the median round is reported with the spread. Tokens are the generated tokens each side reports; both must agree on the texts.
Writes benchmarks/results/generate_vs_offline.json and prints a table.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "generate_vs_offline.json"
MAX_TOKENS = 32
# the offline engine as servegen starts a CPU server (servegen/server/vllm.py), chunked prefill off included
ENGINE = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5, max_model_len=512,
              enable_chunked_prefill=False)
LIMITS = dict(max_num_seqs=256, max_num_batched_tokens=4096)  # vLLM's offline defaults on CPU


def questions(n: int) -> list[str]:
    from servegen.demo_model.data import all_pairs, format_question

    pairs = all_pairs()
    return [format_question(*pairs[i % len(pairs)], wording=(i // len(pairs)) % 3) for i in range(n)]


def offline(model: str, prompts_file: Path, limits: str) -> None:
    """Runs in its own process: vLLM's offline engine over the prompt strings, once per line on
    stdin, each round's result as a line `result {json}` on stdout (where vLLM logs too)."""
    from vllm import LLM, SamplingParams

    prompts = json.loads(prompts_file.read_text())
    llm = LLM(model=model, **ENGINE, **(LIMITS if limits == "same" else {}))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    llm.generate(prompts[:64], params, use_tqdm=False)  # warm-up
    print("offline engine ready", flush=True)
    for _ in sys.stdin:
        started = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - started
        texts = [r.outputs[0].text for r in results]
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        print("result " + json.dumps({"wall_s": wall, "tokens": tokens, "texts": texts}), flush=True)


def wait_for_line(proc: subprocess.Popen, marker: str, what: str) -> str:
    while True:
        line = proc.stdout.readline()
        if marker in line:
            return line
        if not line and proc.poll() is not None:
            raise SystemExit(f"{what} did not start")


def served_once(command: list[str], data: Path, out: Path) -> dict:
    started = time.perf_counter()
    subprocess.run(command + ["--input_file", str(data), "--output_dir", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "output.jsonl").read_text().splitlines()]
    summary = json.loads((out / "output.summary.json").read_text())
    return {"wall_s": wall, "tokens": sum(r["num_generated_tokens"] for r in rows),
            "texts": [r["generation"] for r in rows], "in_job_wall_s": summary["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 20,000 rows: each side runs ~45 s, a job of a size servegen is for; at 4,000 (~10 s) the job's
    # fixed ~0.5-s process start-up is 5% of the run and single rounds spread much more on this
    # shared machine (benchmarks/README.md has both)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine_limits", choices=["same", "vllm-defaults"], default="same",
                        help="256 sequences / 4096 tokens / no statistics on both sides, or vLLM's own defaults")
    parser.add_argument("--job_args", default="",
                        help="extra overrides for the servegen job, e.g. '++prompts_per_request=64'")
    parser.add_argument("--offline_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        offline(args.offline_worker[0], Path(args.offline_worker[1]), args.offline_worker[2])
        return

    from servegen.demo_model import build_demo_model
    from servegen.demo_model.data import format_prompt
    from servegen.server.command import ServerSpec
    from servegen.server.vllm import build_command

    model = str(build_demo_model())
    qs = questions(args.rows)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps([format_prompt(q) for q in qs]))
        # the environment servegen gives a vLLM CPU server (KV cache size, loopback, no telemetry)
        cpu_env = build_command(ServerSpec(server_type="vllm", model=model, gpus=0)).env
        env = {**os.environ, **cpu_env, "VLLM_CACHE_ROOT": str(work / "vllm-cache")}
        server_args = f"--max-model-len {ENGINE['max_model_len']}"
        if args.engine_limits == "same":
            server_args += (f" --max-num-seqs {LIMITS['max_num_seqs']} --max-num-batched-tokens "
                            f"{LIMITS['max_num_batched_tokens']} --disable-log-stats")
        offline_proc = subprocess.Popen(
            [sys.executable, __file__, "--offline_worker", model, str(prompts_file), args.engine_limits],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "servegen.pipeline.start_server", "--model", model, "--server_type", "vllm",
             "--server_gpus", "0", "--server_args", server_args, "--log_dir", str(work / "logs")],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "VLLM_CACHE_ROOT": str(work / "vllm-cache")},
        )
        try:
            wait_for_line(offline_proc, "offline engine ready", "the offline engine")
            address = wait_for_line(server, "ready at", f"the vLLM server (logs: {work}/logs)").split("ready at ")[1].split()[0]
            data = work / "input.jsonl"
            data.write_text("".join(json.dumps({"question": q}) + "\n" for q in qs))
            warm = work / "warm.jsonl"
            warm.write_text("".join(json.dumps({"question": q}) + "\n" for q in qs[:64]))
            command = [sys.executable, "-m", "servegen.pipeline.generate", "--server_address", address,
                       "--server_type", "vllm", "++prompt_template=llama3-instruct",
                       f"++inference.tokens_to_generate={MAX_TOKENS}", "++inference.temperature=0.0",
                       *shlex.split(args.job_args)]
            served_once(command, warm, work / "warm")
            for r in range(args.rounds):
                offline_proc.stdin.write("go\n")
                offline_proc.stdin.flush()
                off = json.loads(wait_for_line(offline_proc, "result ", "the offline round").split("result ", 1)[1])
                srv = served_once(command, data, work / f"out{r}")
                rounds.append({"offline": off, "servegen": srv})
        finally:
            offline_proc.stdin.close()
            offline_proc.wait(120)
            server.send_signal(2)
            server.wait(60)

    table = []
    for r in rounds:
        row = {side: {"wall_s": round(r[side]["wall_s"], 3), "tokens": r[side]["tokens"],
                      "tokens_per_s": round(r[side]["tokens"] / r[side]["wall_s"])} for side in ("offline", "servegen")}
        row["ratio"] = round(row["servegen"]["tokens_per_s"] / row["offline"]["tokens_per_s"], 3)
        # the job's own rate (its summary: requests only, without the process's start-up)
        row["servegen"]["in_job_tokens_per_s"] = round(r["servegen"]["tokens"] / r["servegen"]["in_job_wall_s"])
        row["in_job_ratio"] = round(row["servegen"]["in_job_tokens_per_s"] / row["offline"]["tokens_per_s"], 3)
        row["identical_texts"] = sum(a == b for a, b in zip(r["offline"]["texts"], r["servegen"]["texts"]))
        table.append(row)
    ratios = [row["ratio"] for row in table]
    median = statistics.median(ratios)
    in_job = [row["in_job_ratio"] for row in table]
    result = {"rows": args.rows, "max_tokens": MAX_TOKENS, "engine": ENGINE,
              "engine_limits": {**LIMITS, "log_stats": False} if args.engine_limits == "same"
              else "vLLM defaults (offline 256/4096 without statistics, server 128/2048 with)",
              "servegen_job": "defaults (short generations: 64 prompts per request, 64 requests in flight)"
              + (f"; {args.job_args}" if args.job_args else ""),
              "load_average_at_end": os.getloadavg(), "rounds": table,
              "ratio_servegen_to_offline": {"median": median, "min": min(ratios), "max": max(ratios)},
              "in_job_ratio": {"median": statistics.median(in_job), "min": min(in_job), "max": max(in_job)}}
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.rows} prompts, greedy, <= {MAX_TOKENS} new tokens, demo model on vLLM CPU, "
          f"engine limits: {args.engine_limits}" + (f", job: {args.job_args}" if args.job_args else ""))
    print(f"{'round':>5} {'offline tok/s':>14} {'servegen tok/s':>15} {'ratio':>7} {'in-job tok/s':>13} "
          f"{'in-job ratio':>13} {'identical texts':>16}")
    for i, row in enumerate(table):
        print(f"{i + 1:>5} {row['offline']['tokens_per_s']:>14} {row['servegen']['tokens_per_s']:>15} "
              f"{row['ratio']:>7.2f} {row['servegen']['in_job_tokens_per_s']:>13} {row['in_job_ratio']:>13.2f} "
              f"{row['identical_texts']:>10}/{args.rows}")
    print(f"servegen / offline: median {median:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"in-job: median {statistics.median(in_job):.2f} (min {min(in_job):.2f}, max {max(in_job):.2f}); "
          f"load average {os.getloadavg()[0]:.1f}   ({RESULT})")


if __name__ == "__main__":
    main()
