"""`servegen convert` on the real single-machine Slurm cluster (tests/slurm/start.sh): the demo model
to a TensorRT-LLM checkpoint (tp 2) and back to Hugging Face, each a Slurm job that runs the
conversion for real, chained by --run_after; then a generation job with its own vLLM CPU server on
the model that came back, which answers as the same job on the original does."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from servegen.conversion.check import MARKER
from servegen.demo_model.data import format_question, held_out_pairs
from slurm.cluster import dependency_of, require_slurm, unique, wait_for_history, wait_for_job

pytestmark = pytest.mark.slurm

CONFIG = Path(__file__).resolve().parents[1] / "slurm" / "configs" / "test-slurm.yaml"
SERVEGEN = Path(sys.executable).with_name("servegen")  # the console command, as users type it


def servegen(tmp_path: Path, *args: str) -> str:
    """`servegen ARGS --cluster <test cluster>`: its stdout (the job it submitted)."""
    done = subprocess.run([str(SERVEGEN), *args, "--cluster", str(CONFIG)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")})  # sbatch passes it on
    assert done.returncode == 0, done.stderr
    return done.stdout


def convert(tmp_path: Path, source: Path, target: Path, expname: str, *args: str) -> str:
    out = servegen(tmp_path, "convert", "--input_model", str(source), "--output_model", str(target), "--expname",
                   expname, "--log_dir", str(tmp_path / "logs"), *args)
    [job] = re.findall(r"submitted Slurm job (\d+) ", out)
    return job


def generate(tmp_path: Path, model: Path, data: Path, out: Path, expname: str, *args: str) -> str:
    stdout = servegen(tmp_path, "generate", "--input_file", str(data), "--output_dir", str(out), "--model", str(model),
                      "--server_type", "vllm", "--server_gpus", "0", "--expname", expname,
                      "++prompt_template=llama3-instruct", "++inference.tokens_to_generate=16", *args)
    [job] = re.findall(r"submitted job (\d+)", stdout)
    return job


def job_log(folder: Path, job: str) -> str:
    """What the job printed (submitit's log, stderr included)."""
    log = folder / f"{job}_0_log.out"
    return log.read_text() if log.exists() else f"no log {log}"


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "output.jsonl").read_text().splitlines()]


def test_the_demo_model_through_trtllm_and_back_on_slurm_answers_as_the_original(demo_model, tmp_path):
    require_slurm()
    pairs = held_out_pairs()[:50]
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": format_question(a, b), "a": a, "b": b}) + "\n"
                            for a, b in pairs))
    trt, back = tmp_path / "demo-trt", tmp_path / "demo-back"
    names = {step: unique(step) for step in ("original", "to-trt", "to-hf", "back")}
    # --run_after waits only for jobs still queued or running: the original's generation (a vLLM
    # start-up of a minute) goes first, so that each job is queued when the next names it
    chain = [
        generate(tmp_path, demo_model, data, tmp_path / "out-original", names["original"]),
        convert(tmp_path, demo_model, trt, names["to-trt"], "--convert_from", "hf", "--convert_to", "trtllm",
                "--checkpoint_only", "--num_gpus", "2", "--run_after", names["original"]),
        convert(tmp_path, trt, back, names["to-hf"], "--convert_from", "trtllm", "--convert_to", "hf",
                "--run_after", names["to-trt"]),
        generate(tmp_path, back, data, tmp_path / "out-back", names["back"], "--run_after", names["to-hf"]),
    ]
    for before, job in zip(chain, chain[1:]):
        assert re.fullmatch(rf"afterany:{before}(\(unfulfilled\))?", dependency_of(job)), dependency_of(job)
    log_dirs = [tmp_path / "out-original" / "logs", tmp_path / "logs", tmp_path / "logs",
                tmp_path / "out-back" / "logs"]
    for job, folder in zip(chain, log_dirs):
        assert wait_for_job(job, timeout_s=600) == "COMPLETED", job_log(folder, job)
    runs = [wait_for_history(job, "COMPLETED")[-1] for job in chain]
    assert all(a["end"] <= b["start"] for a, b in zip(runs, runs[1:])), runs  # ISO times compare as strings

    # the conversions ran for real, in the jobs
    trt_config, back_config = (json.loads((folder / "config.json").read_text()) for folder in (trt, back))
    assert trt_config["mapping"]["tp_size"] == 2 and trt_config["dtype"] == back_config["dtype"] == "bfloat16"
    assert {"rank0.safetensors", "rank1.safetensors", "tokenizer.json", MARKER} <= {p.name for p in trt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in back.iterdir()}
    assert all("servegen: converted" in job_log(tmp_path / "logs", job) for job in chain[1:3])

    original, returned = rows(tmp_path / "out-original"), rows(tmp_path / "out-back")
    assert [(r["a"], r["b"]) for r in returned] == [(r["a"], r["b"]) for r in original] == pairs
    # real answers, not empty ones that would agree as well
    correct = sum(r["generation"].strip() == f"{r['a']} + {r['b']} = {r['a'] + r['b']}." for r in original)
    assert correct >= 0.95 * len(pairs), [r["generation"] for r in original]
    # bf16 (convert's default --dtype) rounds the float32 weights on the way: a greedy token may
    # flip where two were nearly tied (none did when this was written)
    same = sum(a["generation"] == b["generation"] for a, b in zip(original, returned))
    assert same >= 0.95 * len(pairs), [(a["generation"], b["generation"]) for a, b in zip(original, returned)
                                       if a["generation"] != b["generation"]]
