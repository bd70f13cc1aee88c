"""servegen's own Hugging Face <-> TensorRT-LLM checkpoint converter (docs/conversion.md): the
unified checkpoint format TensorRT-LLM's `trtllm-build` reads (config.json and one
rank{r}.safetensors per tp x pp rank), written with torch and plain file I/O, tensors streamed
a chunk at a time. TensorRT-LLM itself is never imported (it cannot be installed here)."""

from servegen.conversion.trtllm.convert import hf_to_trtllm, trtllm_to_hf
from servegen.conversion.trtllm.hf import check_hf_model
from servegen.conversion.trtllm.model import SUPPORTED_ARCHITECTURES

__all__ = ["SUPPORTED_ARCHITECTURES", "check_hf_model", "hf_to_trtllm", "trtllm_to_hf"]
