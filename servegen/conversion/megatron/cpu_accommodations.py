"""What Megatron-Bridge and Megatron-Core need to run on a machine with no GPU, in one place
(docs/conversion.md; measured in the notes on conversion on CPU). Runs inside the bridge's
environment; `apply()` does nothing where CUDA is available, so the same script runs unchanged
on a GPU node.

1. `megatron.bridge.peft.lora_layers` imports `transformer_engine.pytorch` unconditionally, for
   annotations and isinstance checks of LoRA layers, which a conversion never builds. While that
   one module executes, a placeholder stands in for Transformer Engine; every other module still
   finds it absent (as megatron-core decides for itself when it imports).
2. The default layer spec is Transformer Engine's: the local spec instead, and the fusions (CUDA
   kernels) off: `configure_provider`.
3. `torch.cuda.get_rng_state()` (the bridge's save) and `torch.cuda.synchronize()` /
   `torch.cuda.current_device()` (megatron-core's dist_checkpointing) raise without CUDA: the
   CPU's rng state, a no-op and the CPU device's index stand in.
4. A gloo process group and CPU initialisation: `DIST_BACKEND`, `USE_CPU_INITIALIZATION`.
"""

import importlib.abc
import importlib.machinery
import sys
import types

import torch

ON_CPU = not torch.cuda.is_available()
DIST_BACKEND = "gloo" if ON_CPU else "nccl"
USE_CPU_INITIALIZATION = ON_CPU
FUSIONS = ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
           "apply_rope_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")
_LORA_LAYERS = "megatron.bridge.peft.lora_layers"


def apply() -> None:
    """Before anything of megatron is imported."""
    if not ON_CPU:
        return
    sys.meta_path.insert(0, _LoraLayersFinder())
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = lambda: "cpu"  # used as a device for small collectives, which gloo does on the CPU


def configure_provider(provider) -> None:
    """A GPTModelProvider built from local (torch) layers, with no fused CUDA kernels."""
    if not ON_CPU:
        return
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_layer_spec = local_layer_spec
    for name in FUSIONS:
        if hasattr(provider, name):
            setattr(provider, name, False)


class _Absent:
    """A Transformer Engine class nothing is an instance of."""


def _placeholder() -> dict[str, types.ModuleType]:
    te, pytorch, ops = (types.ModuleType(n) for n in (
        "transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.ops"))
    te.pytorch, pytorch.ops = pytorch, ops
    pytorch.__getattr__ = ops.__getattr__ = lambda name: _Absent
    return {m.__name__: m for m in (te, pytorch, ops)}


class _LoraLayersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _LORA_LAYERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None:
            spec.loader = _WithPlaceholder(spec.loader)
        return spec


class _WithPlaceholder(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        placeholder = _placeholder()
        before = set(sys.modules)
        sys.modules.update(placeholder)
        try:
            self.loader.exec_module(module)
        finally:
            for name in placeholder:
                sys.modules.pop(name, None)
        # another module imported meanwhile that took the placeholder for the real thing
        took = sorted(n for n in set(sys.modules) - before - {module.__name__}
                      if any(v in placeholder.values() for v in vars(sys.modules[n]).values()))
        if took:
            raise RuntimeError(f"took Transformer Engine's placeholder for the real one: {', '.join(took)}")
