"""The small Hugging Face models the conversion tests build (random weights, float32, seeded):
a Llama with grouped-query attention (4 query heads, 2 kv heads), three layers (pipeline stages
of unequal size) and a vocabulary no tp divides (lm_head padding), and a Qwen2 of the same
shape with its qkv biases. The demo model (MHA, two layers) is the third."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHAPE = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=101, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
KINDS = {
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, {"rope_theta": 50000.0}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"rope_theta": 1000000.0}),
}


def build_tiny_model(kind: str, path: Path, seed: int = 0, **sizes) -> Path:
    """A model folder (config.json, model.safetensors) at `path`; the same seed, the same weights.
    `sizes` replace SHAPE's (a wider model, whose files take a while to write)."""
    config_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SHAPE, **sizes}, **extra)).to(torch.float32)
    with torch.no_grad():  # norms and biases away from their init, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path, safe_serialization=True)
    return path
