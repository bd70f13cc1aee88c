"""servegen's HF <-> TensorRT-LLM checkpoint converter, on real models: the tiny Llama (GQA) and
Qwen2 (qkv biases) of tiny_models.py and the demo model (MHA), at tp x pp in (1,1), (2,1), (4,1),
(1,2), (2,2). TensorRT-LLM cannot run here, so an independent loader below runs the checkpoint
the way TensorRT-LLM's Llama/Qwen2 would (each tp rank on its own shards, partial sums added
as its all-reduce does, logits gathered, each pipeline stage its own layers) and its logits must
equal transformers' in float32; converting back must give the original tensors, byte for byte;
config.json and every rank's tensor names and shapes are golden files."""

import errno
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from servegen.conversion.trtllm import SUPPORTED_ARCHITECTURES, check_hf_model, hf_to_trtllm, trtllm_to_hf
from servegen.errors import ConversionError
from tests.conversion.tiny_models import build_tiny_model

SPLITS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]
MODELS = ["llama-gqa", "qwen2", "demo"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model):
    root = tmp_path_factory.mktemp("hf")
    tiny = {kind: build_tiny_model(kind, root / kind) for kind in ("llama-gqa", "qwen2")}
    return {**tiny, "demo": demo_model}


@pytest.fixture(scope="module")
def token_ids():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 101, (n,), generator=generator) for n in (1, 7, 19)]  # 101: every model's vocab holds these


def hf_logits(folder, token_ids) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(ids[None]).logits[0] for ids in token_ids]


@pytest.fixture(scope="module")
def reference_logits(models, token_ids):
    return {kind: hf_logits(folder, token_ids) for kind, folder in models.items()}


class ReferenceModel:
    """A TensorRT-LLM checkpoint run in plain torch, with TensorRT-LLM's semantics: RMSNorm,
    attention.qkv = this rank's q, k, v rows, rope_gpt_neox at rotary_base, GQA, attention.dense
    and mlp.proj partial sums added over tp ranks, GatedMLP act(fc(x)) * gate(x), lm_head's
    rows gathered over tp ranks and the padding dropped, layer numbers local to each stage."""

    def __init__(self, folder):
        self.c = json.loads((folder / "config.json").read_text())
        mapping = self.c["mapping"]
        self.tp, self.pp = mapping["tp_size"], mapping["pp_size"]
        assert mapping["world_size"] == self.tp * self.pp
        files = sorted(p.name for p in folder.glob("rank*.safetensors"))
        assert files == sorted(f"rank{r}.safetensors" for r in range(self.tp * self.pp))
        ranks = [load_file(folder / f"rank{r}.safetensors") for r in range(self.tp * self.pp)]
        self.stages = [ranks[s * self.tp : (s + 1) * self.tp] for s in range(self.pp)]
        counts = [len({k.split(".")[2] for k in stage[0] if k.startswith("transformer.layers.")}) for stage in self.stages]
        base, extra = divmod(self.c["num_hidden_layers"], self.pp)
        assert counts == [base + (s < extra) for s in range(self.pp)]
        assert all(("transformer.vocab_embedding.weight" in r) == (s == 0) for s, stage in enumerate(self.stages) for r in stage)
        assert all(("lm_head.weight" in r) == (s == self.pp - 1) for s, stage in enumerate(self.stages) for r in stage)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for stage in self.stages:
            for layer in range(len({k.split(".")[2] for k in stage[0] if k.startswith("transformer.layers.")})):
                x = self.layer(x, stage, f"transformer.layers.{layer}.")
        last = self.stages[-1]
        x = self.norm(x, replicated(last, "transformer.ln_f.weight"))
        return torch.cat([x @ r["lm_head.weight"].T for r in last], dim=-1)[:, : self.c["vocab_size"]]

    def embed(self, ids):
        first = self.stages[0]
        if not self.c["use_parallel_embedding"]:
            return replicated(first, "transformer.vocab_embedding.weight")[ids]
        out = 0
        for tp_rank, r in enumerate(first):  # each rank looks up the ids in its rows; summed
            table = r["transformer.vocab_embedding.weight"]
            local = ids - tp_rank * table.shape[0]
            hit = (local >= 0) & (local < table.shape[0])
            out = out + table[local.clamp(0, table.shape[0] - 1)] * hit[:, None]
        return out

    def layer(self, x, stage, p):
        h = self.norm(x, replicated(stage, p + "input_layernorm.weight"))
        x = x + sum(self.attention(h, r, p) for r in stage)
        h = self.norm(x, replicated(stage, p + "post_layernorm.weight"))
        assert self.c["hidden_act"] == "silu"
        gated = ((F.silu(h @ r[p + "mlp.fc.weight"].T) * (h @ r[p + "mlp.gate.weight"].T), r) for r in stage)
        return x + sum(g @ r[p + "mlp.proj.weight"].T for g, r in gated)

    def attention(self, h, r, p):
        d, n_q = self.c["head_size"], self.c["num_attention_heads"] // self.tp
        n_kv = max(self.c["num_key_value_heads"] // self.tp, 1)
        qkv = h @ r[p + "attention.qkv.weight"].T
        if self.c["attn_bias"]:
            qkv = qkv + r[p + "attention.qkv.bias"]
        q, k, v = (t.view(len(h), -1, d).transpose(0, 1) for t in qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1))
        q, k = self.rope(q), self.rope(k)
        k, v = k.repeat_interleave(n_q // n_kv, dim=0), v.repeat_interleave(n_q // n_kv, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(len(h), len(h), dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(h), n_q * d)
        return out @ r[p + "attention.dense.weight"].T

    def rope(self, x):
        """GPT-NeoX rotary embedding: the two halves of each head rotated together."""
        d = self.c["rotary_embedding_dim"]
        assert d == x.shape[-1] and self.c["position_embedding_type"] == "rope_gpt_neox" and self.c["rotary_scaling"] is None
        inv_freq = 1.0 / self.c["rotary_base"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["norm_epsilon"]) * w


def replicated(ranks, name):
    """A tensor every tp rank holds whole: the same on each."""
    assert all(torch.equal(r[name], ranks[0][name]) for r in ranks), f"{name} differs between tp ranks"
    return ranks[0][name]


def rank_listing(folder) -> str:
    lines = []
    for path in sorted(folder.glob("rank*.safetensors"), key=lambda p: int(p.stem[4:])):
        lines.append(path.name)
        with safe_open(path, "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                lines.append(f"  {name} {s.get_dtype()} {s.get_shape()}")
    return "\n".join(lines) + "\n"


def assert_same_tensors(original, converted, dtype=None):
    a, b = load_file(original), load_file(converted)
    assert sorted(a) == sorted(b)
    for name in a:
        want = a[name] if dtype is None else a[name].to(dtype)
        assert want.dtype == b[name].dtype and want.shape == b[name].shape, name
        assert want.view(torch.uint8).equal(b[name].view(torch.uint8)), f"{name} differs"


def convert(src, dst, tp, pp, dtype="float32", **kw):
    dst.mkdir()
    hf_to_trtllm(src, dst, tp, pp, dtype, **kw)
    return dst


@pytest.mark.parametrize("tp,pp", SPLITS, ids=[f"tp{tp}-pp{pp}" for tp, pp in SPLITS])
@pytest.mark.parametrize("kind", MODELS)
def test_checkpoint_runs_like_the_hf_model_and_converts_back(kind, tp, pp, models, token_ids, reference_logits, tmp_path, golden):
    assert check_hf_model(models[kind], tp, pp)["architectures"][0] in SUPPORTED_ARCHITECTURES
    out = convert(models[kind], tmp_path / "trt", tp, pp)
    golden(f"{kind}-tp{tp}-pp{pp}.config.json", (out / "config.json").read_text())
    golden(f"{kind}-tp{tp}-pp{pp}.ranks.txt", rank_listing(out))
    reference = ReferenceModel(out)
    for ids, want in zip(token_ids, reference_logits[kind]):
        torch.testing.assert_close(reference.logits(ids), want, atol=1e-5, rtol=0)
    (tmp_path / "hf").mkdir()
    trtllm_to_hf(out, tmp_path / "hf")
    assert_same_tensors(models[kind] / "model.safetensors", tmp_path / "hf" / "model.safetensors")


def edited(folder, dst, config=None, drop=()):
    """A copy of a model folder with config.json keys changed (None: removed) or tensors dropped."""
    shutil.copytree(folder, dst)
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not None}))
    if drop:
        tensors = load_file(dst / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if k not in drop}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def resharded(folder, dst):
    """The model's weights in two shards and an index, as transformers writes a large model."""
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, dst / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def assert_runs_like(folder, checkpoint, token_ids):
    reference = ReferenceModel(checkpoint)
    for ids, want in zip(token_ids, hf_logits(folder, token_ids)):
        torch.testing.assert_close(reference.logits(ids), want, atol=1e-5, rtol=0)


def test_parallel_embedding_splits_the_vocabulary_padded(models, token_ids, tmp_path):
    out = convert(models["llama-gqa"], tmp_path / "trt", 4, 1, use_parallel_embedding=True)
    assert json.loads((out / "config.json").read_text())["use_parallel_embedding"] is True
    for rank in range(4):  # 101 rows: 26 each, the last rank 23 and 3 rows of zeros
        table = load_file(out / f"rank{rank}.safetensors")["transformer.vocab_embedding.weight"]
        assert table.shape == (26, 64)
    assert table[23:].count_nonzero() == 0
    assert_runs_like(models["llama-gqa"], out, token_ids)
    (tmp_path / "hf").mkdir()
    trtllm_to_hf(out, tmp_path / "hf")
    assert_same_tensors(models["llama-gqa"] / "model.safetensors", tmp_path / "hf" / "model.safetensors")


def test_tied_embeddings_give_lm_head_from_the_embedding(models, token_ids, tmp_path):
    tied = edited(models["llama-gqa"], tmp_path / "tied", config={"tie_word_embeddings": True}, drop={"lm_head.weight"})
    out = convert(tied, tmp_path / "trt", 2, 2)
    embedding = load_file(tied / "model.safetensors")["model.embed_tokens.weight"]
    head = torch.cat([load_file(out / f"rank{r}.safetensors")["lm_head.weight"] for r in (2, 3)])
    assert head.shape == (102, 64) and head[:101].equal(embedding) and head[101:].count_nonzero() == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_runs_like(tied, out, token_ids)
    (tmp_path / "hf").mkdir()
    trtllm_to_hf(out, tmp_path / "hf")
    assert_same_tensors(tied / "model.safetensors", tmp_path / "hf" / "model.safetensors")  # no lm_head, as before


def test_mistral_converts_as_llama_weights(models, token_ids, tmp_path):
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None}
    mistral = edited(models["llama-gqa"], tmp_path / "mistral", config=config)
    out = convert(mistral, tmp_path / "trt", 2, 2)
    assert json.loads((out / "config.json").read_text())["architecture"] == "MistralForCausalLM"
    assert_runs_like(mistral, out, token_ids)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_converted_back_folder_is_the_same_model_to_transformers(kind, models, token_ids, reference_logits, tmp_path):
    out = convert(models[kind], tmp_path / "trt", 2, 2)
    (tmp_path / "hf").mkdir()
    trtllm_to_hf(out, tmp_path / "hf")
    original = json.loads((models[kind] / "config.json").read_text())
    back = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert back["architectures"] == original["architectures"]
    assert back["rope_parameters"]["rope_theta"] == original["rope_parameters"]["rope_theta"]  # 50000 and 1e6, not 10000
    # the tensors are byte-identical (the first test); the logits differ by float rounding
    # (~1e-7 seen: the same weights at other addresses can take other BLAS paths)
    for got, want in zip(hf_logits(tmp_path / "hf", token_ids), reference_logits[kind]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_bfloat16_checkpoint_holds_the_weights_rounded_and_converts_back_unchanged(models, tmp_path):
    out = convert(models["llama-gqa"], tmp_path / "trt", 2, 2, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    (tmp_path / "hf").mkdir()
    trtllm_to_hf(out, tmp_path / "hf")
    assert_same_tensors(models["llama-gqa"] / "model.safetensors", tmp_path / "hf" / "model.safetensors", dtype=torch.bfloat16)
    again = convert(tmp_path / "hf", tmp_path / "trt-again", 2, 2, dtype="bfloat16")  # dtype kept: bytes kept
    for rank in range(4):
        assert (again / f"rank{rank}.safetensors").read_bytes() == (out / f"rank{rank}.safetensors").read_bytes()


def test_sharded_weights_give_the_same_checkpoint(models, tmp_path):
    sharded = resharded(models["qwen2"], tmp_path / "sharded")
    one, two = convert(models["qwen2"], tmp_path / "one", 2, 2), convert(sharded, tmp_path / "two", 2, 2)
    for name in ["config.json", *(f"rank{r}.safetensors" for r in range(4))]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def no_config(model, path):
    path.mkdir()
    return path


def no_weights(model, path):
    shutil.copytree(model, path)
    (path / "model.safetensors").unlink()
    return path


def partial_index(model, path):
    (resharded(model, path) / "model-00002-of-00002.safetensors").unlink()
    return path


def six_heads_two_kv(model, path):
    """A Llama whose 2 kv heads a tp of 3 cannot share out (tp 3 divides its 6 query heads)."""
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
                         vocab_size=32, max_position_embeddings=64, rope_theta=10000.0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def float64_weights(model, path):
    shutil.copytree(model, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def gpt2_config(model, path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2}))
    return path


# case: (the folder, made from the tiny Llama, tp, pp, what the message says)
BAD = {
    "missing folder": (lambda model, path: path, 1, 1, "no such model folder"),
    "no config.json": (no_config, 1, 1, "no config.json"),
    "no weights": (no_weights, 1, 1, "no weights, neither model.safetensors nor model.safetensors.index.json"),
    "partial index": (partial_index, 1, 1, "names 2 shards and 1 are not in the folder (model-00002-of-00002.safetensors)"),
    "a tensor missing": (lambda model, path: edited(model, path, drop={"model.layers.2.mlp.up_proj.weight"}), 1, 1,
                         "the weights lack model.layers.2.mlp.up_proj.weight"),
    "unsupported architecture": (gpt2_config, 1, 1, "architecture GPT2LMHeadModel is not supported; "
                                 "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    "a tensor of another shape": (lambda model, path: edited(model, path, config={"intermediate_size": 128}), 1, 1,
                                  "model.layers.0.mlp.gate_proj.weight has shape [160, 64], config.json implies [128, 64]"),
    "a tensor with no place": (lambda model, path: edited(model, path, config={"num_hidden_layers": 2}), 1, 1,
                               "the weights hold model.layers.2.input_layernorm.weight, which a LlamaForCausalLM has no place for"),
    "float64 weights": (float64_weights, 1, 1, "tensor model.norm.weight is F64; only F32, F16 and BF16 weights convert"),
    "a llama with attention biases": (lambda model, path: edited(model, path, config={"attention_bias": True}), 1, 1,
                                      "LlamaForCausalLM with attention_bias=true is not supported"),
    "tp not dividing the heads": (lambda model, path: model, 3, 1, "tp 3 does not divide the 4 query heads"),
    "kv heads tp cannot share": (six_heads_two_kv, 3, 1, "tp 3 and 2 kv heads: tp must divide the kv heads or be a multiple of them"),
    "pp over the layers": (lambda model, path: model, 1, 4, "pp 4 is more than the 3 layers"),
    "no rope theta": (lambda model, path: edited(model, path, config={"rope_parameters": None, "rope_theta": None}), 1, 1,
                      "no rope_parameters.rope_theta or rope_theta"),
    "a rope scaling TensorRT-LLM lacks": (
        lambda model, path: edited(model, path, config={"rope_parameters": {"rope_type": "proportional", "factor": 2.0,
                                                                             "rope_theta": 10000.0}}), 1, 1,
        "rope scaling 'proportional' is not one TensorRT-LLM takes (linear, dynamic, llama3, yarn, longrope)"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_model_that_cannot_convert_is_refused_in_one_line(case, models, tmp_path):
    make, tp, pp, message = BAD[case]
    src = make(models["llama-gqa"], tmp_path / "model")
    with pytest.raises(ConversionError) as error:
        check_hf_model(src, tp, pp)
    text = str(error.value)
    assert message in text and "\n" not in text and str(src) in text
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError) as again:
        hf_to_trtllm(src, tmp_path / "out", tp, pp, "float32")
    assert str(again.value) == text and not any((tmp_path / "out").iterdir())


def test_outputs_and_inputs_a_conversion_refuses(models, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        hf_to_trtllm(models["llama-gqa"], busy, 1, 1, "float32")
    with pytest.raises(ConversionError, match="dtype int8 is not supported"):
        hf_to_trtllm(models["llama-gqa"], tmp_path, 1, 1, "int8")
    out = convert(models["llama-gqa"], tmp_path / "trt", 2, 1)
    (out / "rank1.safetensors").unlink()
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConversionError, match="no rank1.safetensors"):
        trtllm_to_hf(out, tmp_path / "hf")


def test_a_filesystem_without_o_direct_gets_plain_writes_and_the_same_files(models, tmp_path, monkeypatch):
    """Rank files are written with O_DIRECT (the filesystem here takes it); one that refuses it
    (EINVAL at open, as some do) is written with plain writes, to the same bytes."""
    direct = convert(models["qwen2"], tmp_path / "direct", 2, 2)
    real_open, refused = os.open, []

    def refusing_o_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_o_direct)
    plain = convert(models["qwen2"], tmp_path / "plain", 2, 2)
    assert [p.name for p in refused] == [f"rank{r}.safetensors.partial" for r in range(4)]
    for name in ["config.json", *(f"rank{r}.safetensors" for r in range(4))]:
        assert (plain / name).read_bytes() == (direct / name).read_bytes(), name
