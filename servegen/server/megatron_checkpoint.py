"""Megatron-LM's model flags for a Megatron-Bridge checkpoint. Megatron-LM's own saves keep its
arguments (read back with --use-checkpoint-args); a Bridge checkpoint keeps none, only the model
provider's settings in iter_<N>/run_config.yaml and the HF tokenizer in iter_<N>/tokenizer/. So
the architecture is spelled out as Megatron-LM's flags, from those settings."""

from pathlib import Path

import yaml

from servegen.errors import ServegenError

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_folder(tracked: str) -> str | None:
    """The folder (`iter_0000000`, `release`) of the iteration the tracker file names, or None
    where what it holds is no iteration."""
    tracked = tracked.strip()
    return tracked if tracked == "release" else f"iter_{int(tracked):07d}" if tracked.isdigit() else None


def bridge_iteration(model: str) -> str | None:
    """The iteration folder of a Bridge checkpoint at `model`, or None where `model` is not one
    (no run_config.yaml beside its weights)."""
    folder = Path(model)
    try:
        step = iteration_folder((folder / TRACKER).read_text())
    except OSError:
        return None
    return step if step is not None and (folder / step / "run_config.yaml").is_file() else None


def model_flags(model: str, step: str) -> list[tuple[str, ...]]:
    """(flag, *values) for Megatron-LM: the GPT architecture, the tokenizer, the dtype and the format."""
    try:
        m = yaml.safe_load((Path(model) / step / "run_config.yaml").read_text())["model"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ServegenError(f"{model}/{step}/run_config.yaml cannot be read as a Megatron-Bridge run config: {e}") from None
    if m.get("normalization") != "RMSNorm" or not m.get("gated_linear_unit") or m.get("position_embedding_type") != "rope":
        raise ServegenError(f"{model} is not a Llama-like GPT (RMSNorm, SwiGLU, rope): Megatron-LM's flags for it "
                            "are not derived here; give them in --server_args")
    flags = [("--num-layers", str(m["num_layers"])), ("--hidden-size", str(m["hidden_size"])),
             ("--ffn-hidden-size", str(m["ffn_hidden_size"])), ("--num-attention-heads", str(m["num_attention_heads"]))]
    if m.get("kv_channels"):
        flags.append(("--kv-channels", str(m["kv_channels"])))
    groups = m.get("num_query_groups") or m["num_attention_heads"]
    if groups != m["num_attention_heads"]:
        flags += [("--group-query-attention",), ("--num-query-groups", str(groups))]
    flags += [("--position-embedding-type", "rope"), ("--rotary-base", _number(m["rotary_base"])),
              ("--rotary-percent", _number(m.get("rotary_percent", 1.0))),
              ("--normalization", "RMSNorm"), ("--norm-epsilon", _number(m["layernorm_epsilon"])), ("--swiglu",)]
    if not m.get("share_embeddings_and_output_weights", True):
        flags.append(("--untie-embeddings-and-output-weights",))
    if m.get("add_qkv_bias"):
        flags.append(("--add-qkv-bias",))
    if not m.get("add_bias_linear", True):
        flags.append(("--disable-bias-linear",))
    flags += [("--seq-length", str(m["seq_length"])), ("--max-position-embeddings", str(m["seq_length"])),
              # the checkpoint's embedding rows: padded as the bridge padded them, no more
              ("--make-vocab-size-divisible-by", str(m.get("make_vocab_size_divisible_by") or 1)),
              ("--tokenizer-type", "HuggingFaceTokenizer"), ("--tokenizer-model", f"{model}/{step}/tokenizer")]
    dtype = m.get("params_dtype")  # {_target_: torch.bfloat16, ...} as the bridge writes it
    dtype = dtype.get("_target_") if isinstance(dtype, dict) else None
    if m.get("bf16") or dtype == "torch.bfloat16":
        flags.append(("--bf16",))
    elif m.get("fp16") or dtype == "torch.float16":
        flags.append(("--fp16",))
    return flags + [("--ckpt-format", "torch_dist")]


def _number(value) -> str:
    """1e-06 and 10000.0 as Megatron-LM's argparse reads them back."""
    return repr(float(value)) if isinstance(value, float) else str(value)
