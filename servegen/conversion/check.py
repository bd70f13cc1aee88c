"""The input and output of a conversion, checked where this machine sees them, before anything
runs or queues: a missing or partial folder, an architecture not supported, a tp that does not
divide the heads, an output folder servegen did not complete are one line each."""

import json
from pathlib import Path

from servegen.cluster.config import ClusterConfig
from servegen.conversion.request import MODEL_TYPES, Conversion
from servegen.errors import ConversionError

MARKER = "servegen-conversion.json"  # in a complete output: what it was converted from, and how


def seen_here(path: str, conv: Conversion, cluster: ClusterConfig, flag: str) -> Path:
    """A path as the engine's environment sees it, on this machine (through the mounts)."""
    local = cluster.path_here(path, conv.engine)
    if local is None:
        raise ConversionError(f"{flag} {path} is in no mount of cluster '{cluster.name}': add a mount that holds it")
    return Path(local)


def check_input(conv: Conversion, cluster: ClusterConfig) -> Path:
    """The input's folder on this machine, once it is one the conversion can take."""
    folder = seen_here(conv.input_model, conv, cluster, "--input_model")
    if not folder.is_dir():
        raise ConversionError(f"--input_model {conv.input_model} is not a folder")
    if conv.convert_from == "hf":
        _check_hf(conv, folder)
    elif conv.convert_from == "trtllm":
        _check_trtllm(folder, conv.input_model)
    else:
        _check_megatron(folder, conv.input_model)
    if conv.engine == "megatron" and cluster.container_for("megatron") is None:
        from servegen.conversion.megatron.bridge import require_bridge_python

        require_bridge_python()
    return folder


def check_output(conv: Conversion, cluster: ClusterConfig) -> str:
    """absent or complete (it has the marker); a folder there that servegen did not complete is an
    error. Out of sight here (no mount holds it): absent, and the job will see."""
    local = cluster.path_here(conv.output_model, conv.engine)
    if local is None or not Path(local).exists():
        return "absent"
    if not (Path(local) / MARKER).is_file():
        raise ConversionError(f"--output_model {conv.output_model} exists and is not a complete servegen "
                              "conversion: remove it or choose another folder")
    return "complete"


def _check_hf(conv: Conversion, folder: Path) -> None:
    from servegen.conversion.trtllm import check_hf_model

    # the tp/pp rules are TensorRT-LLM's; a Megatron checkpoint is resharded when it is loaded
    config = check_hf_model(folder, conv.tp if conv.convert_to == "trtllm" else 1,
                            conv.pp if conv.convert_to == "trtllm" else 1)
    architecture = (config.get("architectures") or ["?"])[0]
    if conv.model_type is not None and architecture not in MODEL_TYPES[conv.model_type]:
        raise ConversionError(f"--model_type {conv.model_type} is for {', '.join(MODEL_TYPES[conv.model_type])}; "
                              f"{conv.input_model} is a {architecture}")


def _check_trtllm(folder: Path, name: str) -> None:
    """A TensorRT-LLM checkpoint (not an engine): config.json with its mapping, every rank's file."""
    if list(folder.glob("rank*.engine")):
        raise ConversionError(f"--input_model {name} is a TensorRT-LLM engine; only a checkpoint "
                              "(rank<N>.safetensors, from --checkpoint_only) converts back to hf")
    try:
        mapping = json.loads((folder / "config.json").read_text())["mapping"]
        world = int(mapping["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConversionError(f"--input_model {name} has no TensorRT-LLM config.json (with its mapping)") from None
    missing = [f"rank{r}.safetensors" for r in range(world) if not (folder / f"rank{r}.safetensors").is_file()]
    if missing:
        raise ConversionError(f"--input_model {name} is partial: {', '.join(missing)} missing of {world} ranks")


def _check_megatron(folder: Path, name: str) -> None:
    """A Megatron-Core torch_dist checkpoint: the tracker file and the iteration it names."""
    from servegen.server.megatron_checkpoint import TRACKER, iteration_folder

    tracker = folder / TRACKER
    if not tracker.is_file():
        raise ConversionError(f"--input_model {name} is not a Megatron checkpoint (no {TRACKER})")
    text = tracker.read_text()
    iteration = iteration_folder(text)
    if iteration is None:
        raise ConversionError(f"--input_model {name}: {TRACKER} holds {text.strip()!r}, not an iteration number")
    step = folder / iteration
    missing = [f for f in ("metadata.json", ".metadata") if not (step / f).is_file()]
    if missing:
        raise ConversionError(f"--input_model {name} is partial: {step.name}/{missing[0]} is missing")
