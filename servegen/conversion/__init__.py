"""Checkpoint conversion (`servegen convert`, docs/conversion.md): Hugging Face to TensorRT-LLM
checkpoints (servegen's own code, tp/pp sharding) and engines, and HF <-> Megatron through
Megatron-Bridge in its own environment."""
