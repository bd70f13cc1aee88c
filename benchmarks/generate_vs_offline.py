"""End-to-end tokens/s of `servegen generate` against a running vLLM CPU server, side by side
with vLLM's own offline `LLM.generate` on the same prompts, model, engine flags and sampling.

    .venv/bin/python benchmarks/generate_vs_offline.py [--rows 4000]

Both sides run on servegen's demo model (built if needed), greedy, at most 32 new tokens, with
the CPU engine flags servegen uses (float32, eager, 0.5 memory utilization, max_model_len 512).
Offline: a fresh process loads vllm.LLM, warms up, and times one LLM.generate call over every
prompt. servegen: one vLLM server started with `servegen start_server`, warmed up, then the
wall time of the whole `servegen generate` process (reading the JSONL, building prompts with
the llama3-instruct template, requests, writing the output) is timed. Tokens are the generated
tokens each side reports; both must agree on the texts. Writes
benchmarks/results/generate_vs_offline.json and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "generate_vs_offline.json"
MAX_TOKENS = 32
ENGINE = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5, max_model_len=512)


def questions(n: int) -> list[str]:
    from servegen.demo_model.data import all_pairs, format_question

    pairs = all_pairs()
    return [format_question(*pairs[i % len(pairs)], wording=(i // len(pairs)) % 3) for i in range(n)]


def offline(model: str, prompts_file: Path, out: Path) -> None:
    """Runs in its own process: vLLM's offline engine over the prompt strings."""
    from vllm import LLM, SamplingParams

    prompts = json.loads(prompts_file.read_text())
    llm = LLM(model=model, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    llm.generate(prompts[:64], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    texts = [r.outputs[0].text for r in results]
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    out.write_text(json.dumps({"wall_s": wall, "tokens": tokens, "texts": texts}))


def served(model: str, rows: list[dict], work: Path) -> dict:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(work / "vllm-cache")}
    server = subprocess.Popen(
        [sys.executable, "-m", "servegen.pipeline.start_server", "--model", model, "--server_type", "vllm",
         "--server_gpus", "0", "--server_args", f"--max-model-len {ENGINE['max_model_len']}",
         "--log_dir", str(work / "logs")],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = ""
        while "ready at" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                raise SystemExit(f"the vLLM server did not start; see {work}/logs")
        address = line.split("ready at ")[1].split()[0]
        data = work / "input.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        warm = work / "warm.jsonl"
        warm.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
        command = [sys.executable, "-m", "servegen.pipeline.generate", "--server_address", address,
                   "--server_type", "vllm", "++prompt_template=llama3-instruct",
                   f"++inference.tokens_to_generate={MAX_TOKENS}", "++inference.temperature=0.0",
                   "++max_concurrent_requests=1024"]
        subprocess.run(command + ["--input_file", str(warm), "--output_dir", str(work / "warm")], check=True,
                       capture_output=True)
        started = time.perf_counter()
        subprocess.run(command + ["--input_file", str(data), "--output_dir", str(work / "out")], check=True,
                       capture_output=True)
        wall = time.perf_counter() - started
    finally:
        server.send_signal(2)
        server.wait(60)
    out = [json.loads(line) for line in (work / "out" / "output.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "tokens": sum(r["num_generated_tokens"] for r in out),
            "texts": [r["generation"] for r in out]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--offline_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        offline(args.offline_worker[0], Path(args.offline_worker[1]), Path(args.offline_worker[2]))
        return

    from servegen.demo_model import build_demo_model
    from servegen.demo_model.data import format_prompt
    from servegen.server.command import ServerSpec
    from servegen.server.vllm import build_command

    model = str(build_demo_model())
    qs = questions(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps([format_prompt(q) for q in qs]))
        offline_out = work / "offline.json"
        # the environment servegen gives a vLLM CPU server (KV cache size, loopback, no telemetry)
        cpu_env = build_command(ServerSpec(server_type="vllm", model=model, gpus=0)).env
        subprocess.run([sys.executable, __file__, "--offline_worker", model, str(prompts_file), str(offline_out)],
                       check=True, env={**os.environ, **cpu_env, "VLLM_CACHE_ROOT": str(work / "vllm-cache")})
        off = json.loads(offline_out.read_text())
        srv = served(model, [{"question": q} for q in qs], work)

    same = sum(a == b for a, b in zip(off["texts"], srv["texts"]))
    rows = {
        "vllm_offline_LLM_generate": {"wall_s": off["wall_s"], "tokens": off["tokens"]},
        "servegen_generate_via_server": {"wall_s": srv["wall_s"], "tokens": srv["tokens"]},
    }
    for r in rows.values():
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    ratio = rows["servegen_generate_via_server"]["tokens_per_s"] / rows["vllm_offline_LLM_generate"]["tokens_per_s"]
    result = {"rows": args.rows, "max_tokens": MAX_TOKENS, "engine": ENGINE, "identical_texts": same,
              "results": rows, "ratio_servegen_to_offline": ratio}
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.rows} prompts, greedy, <= {MAX_TOKENS} new tokens, demo model on vLLM CPU")
    print(f"{'':32} {'wall s':>8} {'tokens':>8} {'tokens/s':>10}")
    for name, r in rows.items():
        print(f"{name:32} {r['wall_s']:8.2f} {r['tokens']:8d} {r['tokens_per_s']:10.0f}")
    print(f"servegen / offline: {ratio:.2f}   identical texts: {same}/{args.rows}   ({RESULT})")


if __name__ == "__main__":
    main()
