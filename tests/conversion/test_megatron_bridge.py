"""HF <-> Megatron-Core (torch_dist) through real Megatron-Bridge, on the CPU, in its own
environment (.venv-megatron, scripts/setup-megatron-bridge.sh): `servegen convert` both ways on
the demo model (MHA) and the tiny Qwen2 (GQA, qkv biases); the round trip gives every tensor back
bit for bit; the checkpoint, read back by megatron-core's own dist_checkpointing in that
environment, holds the global (tp/pp-agnostic) tensors Megatron-Core names, with the values
the HF weights imply (qkv interleaved per query group, fc1 = gate then up)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_model

from servegen.conversion.megatron.bridge import PYTHON_ENV, SETUP, bridge_python

READ_CHECKPOINT = Path(__file__).parent / "bridge_env" / "read_checkpoint.py"
MODELS = ["demo", "qwen2"]


def convert(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servegen.pipeline.convert", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def bridge() -> str:
    python = bridge_python()
    if not os.access(python, os.X_OK):  # never a skip: CI builds it (scripts/test.sh)
        pytest.fail(f"Megatron-Bridge's environment is missing ({python}): run {SETUP}")
    return python


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model) -> dict[str, Path]:
    return {"demo": demo_model, "qwen2": build_tiny_model("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")}


@pytest.fixture(scope="module")
def converted(bridge, models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each model to megatron (fp32, as it is stored: exact) and back."""
    out = {}
    for name, hf in models.items():
        root = tmp_path_factory.mktemp(name)
        megatron, back = root / "megatron", root / "back"
        done = convert("--input_model", str(hf), "--output_model", str(megatron), "--convert_from", "hf",
                       "--convert_to", "megatron", "--dtype", "fp32")
        assert done.returncode == 0, done.stderr[-3000:]
        done = convert("--input_model", str(megatron), "--output_model", str(back), "--convert_from", "megatron",
                       "--convert_to", "hf")
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = megatron, back
    return out


@pytest.mark.parametrize("name", MODELS)
def test_the_round_trip_gives_every_tensor_back_bit_for_bit(models, converted, name):
    original = load_file(models[name] / "model.safetensors")
    megatron, back = converted[name]
    returned = load_file(back / "model.safetensors")
    assert sorted(returned) == sorted(original)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == json.loads((models[name] / "config.json").read_text())["architectures"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(back)  # a folder transformers loads
    if name == "demo":  # the tokenizer the checkpoint kept comes back beside the weights
        assert (back / "tokenizer.json").read_bytes() == (models[name] / "tokenizer.json").read_bytes()
        assert (megatron / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", MODELS)
def test_the_checkpoint_is_what_megatron_core_reads(bridge, models, converted, name, tmp_path):
    megatron, _ = converted[name]
    assert (megatron / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    step = megatron / "iter_0000000"
    assert json.loads((step / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert {".metadata", "__0_0.distcp", "run_config.yaml"} <= {p.name for p in step.iterdir()}
    saved = tmp_path / "tensors.pt"
    done = subprocess.run([bridge, str(READ_CHECKPOINT), str(step), str(saved)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tensors = {k: v for k, v in torch.load(saved).items() if not k.endswith("._extra_state")}
    assert tensors.keys() == expected_tensors(models[name]).keys()
    for key, tensor in expected_tensors(models[name]).items():
        assert tensors[key].dtype == torch.float32 and torch.equal(tensors[key], tensor), key


def expected_tensors(hf: Path) -> dict[str, torch.Tensor]:
    """Megatron-Core's global tensors for an HF Llama/Qwen2, as the notes on conversion describe
    them: layers stacked on dim 0, Transformer-Engine-style names (norms inside the linear that
    follows them), qkv as [q heads of group g, k_g, v_g] for each query group g."""
    c = json.loads((hf / "config.json").read_text())
    w = load_file(hf / "model.safetensors")
    heads, groups = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads

    def qkv(i: int, kind: str) -> torch.Tensor:
        p = f"model.layers.{i}.self_attn."
        q = w[p + f"q_proj.{kind}"].reshape(groups, heads // groups * head_dim, -1)
        k, v = (w[p + f"{n}_proj.{kind}"].reshape(groups, head_dim, -1) for n in "kv")
        return torch.cat([q, k, v], dim=1).reshape(-1, *w[p + f"q_proj.{kind}"].shape[1:])

    def stacked(fn) -> torch.Tensor:
        return torch.stack([fn(i) for i in range(c["num_hidden_layers"])])

    layer = "model.layers.{}."
    out = {
        "embedding.word_embeddings.weight": w["model.embed_tokens.weight"],
        "decoder.layers.self_attention.linear_qkv.weight": stacked(lambda i: qkv(i, "weight")),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
            stacked(lambda i: w[layer.format(i) + "input_layernorm.weight"]),
        "decoder.layers.self_attention.linear_proj.weight": stacked(lambda i: w[layer.format(i) + "self_attn.o_proj.weight"]),
        "decoder.layers.mlp.linear_fc1.weight": stacked(lambda i: torch.cat(
            [w[layer.format(i) + "mlp.gate_proj.weight"], w[layer.format(i) + "mlp.up_proj.weight"]])),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight":
            stacked(lambda i: w[layer.format(i) + "post_attention_layernorm.weight"]),
        "decoder.layers.mlp.linear_fc2.weight": stacked(lambda i: w[layer.format(i) + "mlp.down_proj.weight"]),
        "decoder.final_layernorm.weight": w["model.norm.weight"],
        "output_layer.weight": w["lm_head.weight"],
    }
    if "model.layers.0.self_attn.q_proj.bias" in w:  # Qwen2
        out["decoder.layers.self_attention.linear_qkv.bias"] = stacked(lambda i: qkv(i, "bias"))
    return out


def test_a_megatron_input_is_checked_before_anything_runs(converted, tmp_path):
    megatron, _ = converted["qwen2"]
    out = tmp_path / "out"

    def to_hf(src: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return convert("--input_model", str(src), "--output_model", str(out), "--convert_from", "megatron",
                       "--convert_to", "hf", env=env)

    cases = {}
    (tmp_path / "empty").mkdir()
    cases["empty"] = (tmp_path / "empty", f"error: --input_model {tmp_path / 'empty'} is not a Megatron checkpoint "
                      "(no latest_checkpointed_iteration.txt)")
    partial = tmp_path / "partial"
    (partial / "iter_0000000").mkdir(parents=True)
    (partial / "latest_checkpointed_iteration.txt").write_text("0\n")
    cases["partial"] = (partial, f"error: --input_model {partial} is partial: iter_0000000/metadata.json is missing")
    for src, message in cases.values():
        done = to_hf(src)
        assert done.returncode == 2 and done.stderr.strip() == message, done.stderr
    done = to_hf(megatron, env={PYTHON_ENV: str(tmp_path / "no-python")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: Megatron-Bridge's environment is not here ({tmp_path / 'no-python'}): run "
                                   f"{SETUP}, or set {PYTHON_ENV} to a Python that has megatron-bridge, or "
                                   "containers.megatron")
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--convert_to", "megatron", "--dtype", "fp8"], "error: --dtype fp8 is TensorRT-LLM's (ModelOpt calibration); "
                                                    "a Megatron checkpoint takes bf16, fp16 or fp32"),
    (["--convert_to", "megatron", "--num_nodes", "2"], "error: --num_nodes is the pipeline-parallel size of a "
                                                      "TensorRT-LLM checkpoint; a Megatron checkpoint is resharded "
                                                      "when it is loaded"),
])
def test_flags_a_megatron_output_cannot_take_are_one_line(models, tmp_path, flags, message):
    done = convert("--input_model", str(models["qwen2"]), "--output_model", str(tmp_path / "out"),
                   "--convert_from", "hf", *flags)
    assert done.returncode == 2 and done.stderr.strip() == message, done.stderr


def test_megatron_lm_serves_a_bridge_checkpoint_with_flags_from_its_run_config(bridge, models, tmp_path, golden):
    """A Bridge checkpoint has no Megatron-LM arguments to read back (--use-checkpoint-args):
    the flags come from its run_config.yaml. The demo model in bf16, the dtype a server runs."""
    from servegen.server import build_server_command
    from servegen.server.command import ServerSpec

    megatron = tmp_path / "demo-bf16"
    done = convert("--input_model", str(models["demo"]), "--output_model", str(megatron), "--convert_from", "hf",
                   "--convert_to", "megatron")
    assert done.returncode == 0, done.stderr[-3000:]
    script = build_server_command(ServerSpec("megatron", str(megatron), gpus=4)).script
    golden("serve-megatron-bridge-checkpoint-demo-bf16.txt", script.replace(str(megatron), "<checkpoint>") + "\n")
    assert "--use-checkpoint-args" not in script
    user = build_server_command(ServerSpec("megatron", str(megatron), gpus=4, args=("--seq-length", "128"))).script
    assert user.count("--seq-length") == 1 and user.endswith("--seq-length 128")
