"""HF <-> Megatron-Core (torch_dist) through Megatron-Bridge. Runs INSIDE the bridge's environment
(Python 3.12, megatron-core, megatron-bridge: scripts/setup-megatron-bridge.sh, or a NeMo
container), as `python convert_in_bridge_env.py {hf_to_megatron,megatron_to_hf} INPUT OUTPUT`;
servegen copies it there beside cpu_accommodations.py (servegen/conversion/megatron/bridge.py).
Never imported by servegen itself."""

import argparse
import shutil
import sys
from pathlib import Path

import cpu_accommodations

DTYPES = ("bfloat16", "float16", "float32")
HF_CONFIG = "hf_config"  # in the Megatron checkpoint: the HF config it came from, to convert it back


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
    bridge.hf_pretrained.config.save_pretrained(target / HF_CONFIG)
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", target / HF_CONFIG)


def megatron_to_hf(source: Path, target: Path) -> None:
    """The checkpoint's weights into a model built from its run_config.yaml, then written as the
    HF model its hf_config/ (or the HF folder it was converted from) describes. The bridge's own
    export_ckpt() builds its model from Transformer Engine's spec, which the CPU cannot run."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import load_model_config, temporary_distributed_context
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    step = _latest_iteration(source)
    provider, _ = load_model_config(str(step))
    hf_config = source / HF_CONFIG
    if not hf_config.is_dir():  # a checkpoint that servegen did not write: the folder it came from
        hf_config = Path(str(getattr(provider, "hf_model_id", None) or ""))
        if not (hf_config / "config.json").is_file():
            sys.exit(f"error: {source} has no {HF_CONFIG}/ and names no HF folder it came from (hf_model_id)")
    bridge = AutoBridge.from_hf_config(AutoConfig.from_pretrained(hf_config))
    cpu_accommodations.configure_provider(provider)
    provider.finalize()
    with temporary_distributed_context(backend=cpu_accommodations.DIST_BACKEND):
        model = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=cpu_accommodations.USE_CPU_INITIALIZATION)
        state = dist_checkpointing.load({"model": model[0].sharded_state_dict()}, str(step))
        model[0].load_state_dict(state["model"])
        bridge.save_hf_pretrained(model, str(target), show_progress=False)
    if (hf_config / "generation_config.json").is_file():
        shutil.copy2(hf_config / "generation_config.json", target)
    if (step / "tokenizer").is_dir():  # what the bridge saved of the HF tokenizer
        for path in (step / "tokenizer").iterdir():
            if path.is_file():
                shutil.copy2(path, target / path.name)


def _latest_iteration(folder: Path) -> Path:
    text = (folder / "latest_checkpointed_iteration.txt").read_text().strip()
    return folder / (text if text == "release" else f"iter_{int(text):07d}")


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
