"""What a conversion needs to know about a model, whichever side it was read from: the
architecture and the sizes that decide every tensor's name, shape and split."""

from dataclasses import dataclass
from pathlib import Path

from servegen.errors import ConversionError

# HF architecture -> HF model_type. Mistral's weights and TensorRT-LLM model are Llama's.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def check_architecture(where: Path, architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ConversionError(f"{where}: architecture {architecture} is not supported; supported: {supported}")


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str
    norm_epsilon: float
    rope_theta: float
    rope_scaling: dict | None  # HF's rope parameters besides theta, for a rope other than the default
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2's q, k and v projections have biases

    @property
    def q_rows(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_rows(self) -> int:
        return self.num_kv_heads * self.head_size
