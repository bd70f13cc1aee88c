"""HF <-> Megatron-Core (torch_dist) through Megatron-Bridge. Runs INSIDE the bridge's environment
(Python 3.12, megatron-core, megatron-bridge: scripts/setup-megatron-bridge.sh, or a NeMo
container), as `python convert_in_bridge_env.py {hf_to_megatron,megatron_to_hf} INPUT OUTPUT`;
servegen copies it there beside cpu_accommodations.py (servegen/conversion/megatron/bridge.py).
Never imported by servegen itself."""

import argparse
import sys
from pathlib import Path

import cpu_accommodations

DTYPES = ("bfloat16", "float16", "float32")


def hf_to_megatron(source: Path, target: Path, dtype: str) -> None:
    import torch
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    bridge = AutoBridge.from_hf_pretrained(str(source), torch_dtype=getattr(torch, dtype))
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.params_dtype = getattr(torch, dtype)
    provider.bf16, provider.fp16 = dtype == "bfloat16", dtype == "float16"
    cpu_accommodations.configure_provider(provider)
    provider.finalize()
    with temporary_distributed_context(backend=cpu_accommodations.DIST_BACKEND):
        model = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=cpu_accommodations.USE_CPU_INITIALIZATION)
        bridge.save_megatron_model(model, str(target), hf_tokenizer_path=str(source) if _has_tokenizer(source) else None)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="convert_in_bridge_env.py")
    parser.add_argument("direction", choices=("hf_to_megatron", "megatron_to_hf"))
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args(argv)
    cpu_accommodations.apply()
    if args.direction == "hf_to_megatron":
        hf_to_megatron(args.input, args.output, args.dtype)
    else:
        megatron_to_hf(args.input, args.output)
    return 0


if __name__ == "__main__":  # saving starts a spawn Manager, which imports this file again
    sys.exit(main(sys.argv[1:]))
