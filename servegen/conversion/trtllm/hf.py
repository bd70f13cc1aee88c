"""A Hugging Face model folder, read without loading a tensor (config.json, the safetensors
index and headers) and checked before a conversion writes anything; and the config.json a
folder converted back gets."""

import json
from dataclasses import dataclass
from pathlib import Path

from servegen.conversion.trtllm.layout import EMBEDDING, LM_HEAD, hf_shapes
from servegen.conversion.trtllm.model import SUPPORTED_ARCHITECTURES, ModelShape, check_architecture
from servegen.conversion.trtllm.safetensors_read import StoredTensor, read_header
from servegen.errors import ConversionError

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed, never read
# the rope scalings TensorRT-LLM's RotaryScalingType knows (it reads rope_type or type); any other fails its load
TRTLLM_ROPE_SCALINGS = ("linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class HFModel:
    config: dict
    shape: ModelShape
    tensors: dict[str, StoredTensor]


def check_hf_model(src: Path, tp: int, pp: int) -> dict:
    """The HF config of the model at src, once it is known to convert at tp x pp (reads
    config.json and the safetensors headers, no tensor); ConversionError says what to fix."""
    return read_hf_model(Path(src), tp, pp).config


def read_hf_model(src: Path, tp: int, pp: int) -> HFModel:
    """The model at src, checked for a conversion at tp x pp; ConversionError names what to fix."""
    if not src.is_dir():
        raise ConversionError(f"{src}: no such model folder; pass the folder that holds config.json and the weights")
    config = read_json(src / "config.json", f"{src}: no config.json; an HF model folder needs its config.json")
    shape = model_shape(src, config)
    tensors = _stored_tensors(src)
    _check_tensors(src, shape, tensors)
    check_parallel(src, shape, tp, pp)
    return HFModel(config, shape, tensors)


def read_json(path: Path, missing: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(missing) from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not readable JSON ({e}); fix or replace the file") from None


def model_shape(src: Path, c: dict) -> ModelShape:
    """The sizes a conversion needs, from an HF config.json; an architecture or feature it cannot
    convert is refused here."""
    arch = (c.get("architectures") or ["(none)"])[0]
    check_architecture(src, arch)
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag) and arch != "Qwen2ForCausalLM":
            raise ConversionError(f"{src}: {arch} with {flag}=true is not supported (no such biases in TensorRT-LLM's Llama)")
    try:
        heads = c["num_attention_heads"]
        return ModelShape(
            architecture=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_size=c.get("head_dim") or c["hidden_size"] // heads, intermediate_size=c["intermediate_size"],
            max_position_embeddings=c["max_position_embeddings"], hidden_act=c["hidden_act"], norm_epsilon=c["rms_norm_eps"],
            **_rope(src, c), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=arch == "Qwen2ForCausalLM",
        )
    except KeyError as e:
        raise ConversionError(f"{src / 'config.json'}: no {e.args[0]}; a {arch} config needs it") from None


def _rope(src: Path, c: dict) -> dict:
    """Rope theta and scaling, from transformers 5's rope_parameters or the older rope_theta and
    rope_scaling; never a default theta (reading only rope_theta gets 10000 for a transformers 5
    config, silently)."""
    params = c.get("rope_parameters") or {}
    theta = params.get("rope_theta", c.get("rope_theta"))
    if theta is None:
        raise ConversionError(f"{src / 'config.json'}: no rope_parameters.rope_theta or rope_theta; add the model's theta")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if params else dict(c.get("rope_scaling") or {})
    if "type" in scaling:  # the older name of rope_type
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    elif scaling["rope_type"] not in TRTLLM_ROPE_SCALINGS:
        raise ConversionError(f"{src / 'config.json'}: rope scaling {scaling['rope_type']!r} is not one TensorRT-LLM "
                              f"takes ({', '.join(TRTLLM_ROPE_SCALINGS)})")
    return {"rope_theta": float(theta), "rope_scaling": scaling or None}


def _stored_tensors(src: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors weights (an index and its shards, or one file)."""
    if (src / INDEX).exists():
        weight_map = read_json(src / INDEX, f"{src}: {INDEX} cannot be read").get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise ConversionError(
                f"{src}: {INDEX} names {len(shards)} shards and {len(missing)} are not in the folder "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); copy the missing shards"
            )
    elif (src / SINGLE).is_file():
        weight_map, shards = None, [SINGLE]
    else:
        bins = " (it has .bin weights: save the model with safe_serialization=True)" if any(src.glob("*.bin")) else ""
        raise ConversionError(f"{src}: no weights, neither {SINGLE} nor {INDEX} with its shards{bins}")
    tensors = {}
    for shard in shards:
        tensors.update(read_header(src / shard))
    for name, shard in (weight_map or {}).items():
        if name not in tensors or tensors[name].path.name != shard:
            raise ConversionError(f"{src}: {INDEX} puts {name} in {shard}, which does not hold it; index and shards disagree")
    return tensors


def _check_tensors(src: Path, m: ModelShape, tensors: dict[str, StoredTensor]) -> None:
    expected = hf_shapes(m)
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"{src}: the weights lack {missing[0]}{more}; they are partial, or not a {m.architecture}'s")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            got = list(tensors[name].shape)
            raise ConversionError(f"{src}: {name} has shape {got}, config.json implies {list(shape)}; config and weights disagree")
    tied_head = {LM_HEAD} if m.tie_word_embeddings else set()  # some tied models store it anyway
    unknown = [n for n in tensors if n not in expected and n not in tied_head and not n.endswith(_IGNORED)]
    if unknown:
        raise ConversionError(f"{src}: the weights hold {unknown[0]}, which a {m.architecture} has no place for; check config.json")


def check_parallel(where: Path, m: ModelShape, tp: int, pp: int) -> None:
    """The splits TensorRT-LLM can shard this model into."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"{where}: tp and pp must be at least 1 (got tp {tp}, pp {pp})")
    if m.num_heads % tp:
        raise ConversionError(f"{where}: tp {tp} does not divide the {m.num_heads} query heads; use a tp that does")
    kv = m.num_kv_heads
    if (kv < tp and tp % kv) or (kv >= tp and kv % tp):
        raise ConversionError(f"{where}: tp {tp} and {kv} kv heads: tp must divide the kv heads or be a multiple of them")
    if m.intermediate_size % tp:
        raise ConversionError(f"{where}: tp {tp} does not divide intermediate_size {m.intermediate_size}")
    if pp > m.num_layers:
        raise ConversionError(f"{where}: pp {pp} is more than the {m.num_layers} layers; use pp <= {m.num_layers}")


def hf_config(m: ModelShape, dtype: str) -> dict:
    """config.json for the model as an HF folder (rope theta both ways, so that transformers 4
    and 5 both read it)."""
    config = {
        "architectures": [m.architecture], "model_type": SUPPORTED_ARCHITECTURES[m.architecture], "dtype": dtype,
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_size, "max_position_embeddings": m.max_position_embeddings, "hidden_act": m.hidden_act,
        "rms_norm_eps": m.norm_epsilon, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", **(m.rope_scaling or {}), "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_word_embeddings,
    }
    if m.architecture != "Qwen2ForCausalLM":
        config.update(attention_bias=False, mlp_bias=False)
    return config
