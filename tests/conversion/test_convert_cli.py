"""`servegen convert` as users run it: the dry runs (golden: every step's exact command, local and
Slurm, TensorRT-LLM bf16 and fp8 at tp 8 / pp 2, Megatron-Bridge both ways), one-line errors for bad input, a real
local conversion whose output appears only when complete, and the serving side of a converted
model (trtllm engine folders, Megatron checkpoints)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model

from servegen.errors import ServegenError
from servegen.server import build_server_command
from servegen.server.command import ServerSpec

CONFIG = Path(__file__).parent / "configs" / "convert-slurm.yaml"


def convert(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SERVEGEN_MEGATRON_PYTHON"}
    return subprocess.run([sys.executable, "-m", "servegen.pipeline.convert", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


DRY_RUNS = {
    "trtllm-bf16-tp8-pp2": ["--convert_from", "hf", "--convert_to", "trtllm", "--num_gpus", "8", "--num_nodes", "2",
                            "--build_args", "--max_beam_width 2"],
    "trtllm-fp8-tp8-pp2": ["--convert_from", "hf", "--convert_to", "trtllm", "--dtype", "fp8", "--num_gpus", "8",
                           "--num_nodes", "2", "--calib_size", "256"],
    "trtllm-checkpoint-only-tp8-pp2": ["--convert_from", "hf", "--convert_to", "trtllm", "--num_gpus", "8",
                                       "--num_nodes", "2", "--checkpoint_only"],
    "megatron-from-hf-bf16": ["--convert_from", "hf", "--convert_to", "megatron"],
    "megatron-to-hf": ["--convert_from", "megatron", "--convert_to", "hf"],
}


@pytest.mark.parametrize("name", DRY_RUNS)
@pytest.mark.parametrize("where", ["local", "slurm"])
def test_dry_run(golden, tmp_path, name, where):
    cluster = ["--cluster", "local"] if where == "local" else ["--cluster", str(CONFIG), "--log_dir", "/logs"]
    done = convert("--input_model", "/models/llama-3-70b", "--output_model", "/models/out/llama-3-70b-conv",
                   *DRY_RUNS[name], *cluster, "--dry_run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout.replace(sys.executable, "<python>").replace(str(CONFIG), "<config>")
    text = text.replace(str(Path(__file__).resolve().parents[2]), "<repo>")
    golden(f"convert-{where}-{name}.txt", text)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    path = build_tiny_model("llama-gqa", tmp_path_factory.mktemp("hf") / "llama")
    (path / "tokenizer.json").write_text("{}")  # copied beside the output, as a real tokenizer would be
    return path


def hf_to_trtllm(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    return convert("--input_model", str(src), "--output_model", str(dst), "--convert_from", "hf",
                   "--convert_to", "trtllm", "--checkpoint_only", "--dtype", "fp32", *extra)


def test_a_local_conversion_appears_only_when_complete_and_is_not_redone(llama, tmp_path):
    out = tmp_path / "models" / "llama-trt"
    done = hf_to_trtllm(llama, out, "--num_gpus", "2")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "rank0.safetensors", "rank1.safetensors", "servegen-conversion.json",
        "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert [p.name for p in out.parent.iterdir() if "partial" in p.name] == []
    # done: not converted again, unless asked
    before = (out / "rank0.safetensors").stat().st_mtime_ns
    again = hf_to_trtllm(llama, out, "--num_gpus", "2")
    assert again.returncode == 0 and "already converted" in again.stderr
    assert (out / "rank0.safetensors").stat().st_mtime_ns == before
    redo = hf_to_trtllm(llama, out, "--num_gpus", "2", "--rerun_done")
    assert redo.returncode == 0, redo.stderr
    assert (out / "rank0.safetensors").stat().st_mtime_ns != before
    # and back: the tensors as they were
    back = tmp_path / "back"
    done = convert("--input_model", str(out), "--output_model", str(back), "--convert_from", "trtllm",
                   "--convert_to", "hf")
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    original, returned = load_file(llama / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)  # float32 all the way: exact
    assert (back / "tokenizer.json").is_file()


def test_a_failed_conversion_leaves_nothing_that_looks_complete(llama, tmp_path):
    # an engine build where trtllm-build is not installed: the checkpoint step runs, the build fails
    out = tmp_path / "engine"
    done = convert("--input_model", str(llama), "--output_model", str(out), "--convert_from", "hf",
                   "--convert_to", "trtllm")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: step engine failed (exit code 127)")
    assert not out.exists()
    # the partial folder is started again from nothing by the next run
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".engine")] != []


@pytest.mark.parametrize("case, message", [
    ("missing", "error: --input_model {input} is not a folder"),
    ("no weights", "error: "),
    ("unsupported", "error: {input}: architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"),
    ("tp 3", "error: "),
    ("incomplete target", "error: --output_model {output} exists and is not a complete servegen conversion"),
    ("bad pair", "error: cannot convert trtllm -> megatron; servegen converts hf -> trtllm, trtllm -> hf, "
                 "hf -> megatron, megatron -> hf"),
    ("engine to hf", "error: --input_model {input} is a TensorRT-LLM engine"),
])
def test_bad_input_is_one_line_and_exit_2(llama, tmp_path, case, message):
    import shutil

    src, out = tmp_path / "in", tmp_path / "out"
    pair = ["--convert_from", "hf", "--convert_to", "trtllm", "--checkpoint_only"]
    extra: list[str] = []
    if case != "missing":
        shutil.copytree(llama, src)
    if case == "no weights":
        (src / "model.safetensors").unlink()
    if case == "unsupported":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    if case == "tp 3":
        extra = ["--num_gpus", "3"]
    if case == "incomplete target":
        out.mkdir()
        (out / "rank0.safetensors").write_text("")
    if case == "bad pair":
        pair = ["--convert_from", "trtllm", "--convert_to", "megatron"]
    if case == "engine to hf":
        (src / "rank0.engine").write_text("")
        pair = ["--convert_from", "trtllm", "--convert_to", "hf"]
    done = convert("--input_model", str(src), "--output_model", str(out), *pair, *extra)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message.format(input=src, output=out)), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert case == "incomplete target" or not out.exists()


def engine_folder(path: Path, tp: int, pp: int, tokenizer: bool = True) -> Path:
    path.mkdir()
    mapping = {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    (path / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": mapping}, "build_config": {}}))
    for rank in range(tp * pp):
        (path / f"rank{rank}.engine").write_text("")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_trtllm_serves_an_engine_folder_with_the_sizes_it_was_built_for(tmp_path, golden):
    engine = engine_folder(tmp_path / "engine", tp=4, pp=2)
    command = build_server_command(ServerSpec("trtllm", str(engine), gpus=8))
    golden("serve-trtllm-engine-tp4-pp2.txt", command.script.replace(str(engine), "<engine>") + "\n")
    hf = build_server_command(ServerSpec("trtllm", str(tmp_path), gpus=8)).script
    assert "--backend pytorch" in hf and "--backend tensorrt" in command.script
    with pytest.raises(ServegenError, match=r"is an engine built for 8 GPUs \(tp 4, pp 2\); give --server_gpus"):
        build_server_command(ServerSpec("trtllm", str(engine), gpus=4))
    bare = engine_folder(tmp_path / "bare", tp=1, pp=1, tokenizer=False)
    with pytest.raises(ServegenError, match="is an engine without a tokenizer beside it"):
        build_server_command(ServerSpec("trtllm", str(bare), gpus=1))
    assert "--tokenizer /tok" in build_server_command(
        ServerSpec("trtllm", str(bare), gpus=1, args=("--tokenizer", "/tok"))).script
