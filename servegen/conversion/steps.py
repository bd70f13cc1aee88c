"""The steps of a conversion, in order. A step is servegen's own code run in the job's process
(`here`: the TensorRT-LLM checkpoint, copies) or a bash script run in the engine's environment
(`script`: its container, containers.<engine>, when the cluster config names one): TensorRT-LLM's
calibration and `trtllm-build`, Megatron-Bridge. Every step writes into the partial folder
beside the output, which becomes the output only when the last step is done (run.py)."""

import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servegen.conversion.request import Conversion

# TensorRT-LLM's examples in its NGC images (quantize.py is an example, not an installed command)
TRTLLM_EXAMPLES_DEFAULT = "/app/tensorrt_llm/examples"
BRIDGE_SCRIPTS = ".servegen-bridge"  # the bridge's script, copied into the partial folder: containers see it
CHECKPOINT = "checkpoint"  # an engine build's checkpoint, inside the partial folder until the engine is built
# what a server needs beside the weights or the engine
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Folders:
    """The input and the partial output, as the engine's environment sees them (the paths the
    user gave) and as this machine does (through the cluster config's mounts)."""

    input: str
    partial: str
    input_here: Path
    partial_here: Path


@dataclass(frozen=True)
class Step:
    name: str
    here: Callable[[Folders], None] | None = None  # servegen's own code, in this process
    script: Callable[[Folders], str] | None = None  # bash in the engine's environment
    env: dict[str, str] = field(default_factory=dict)  # the script's defaults; the caller's environment wins
    what: Callable[[Folders], str] | None = None  # for a `here` step: what it does, in a line


def steps_of(conv: Conversion, containerised: bool) -> list[Step]:
    """containerised: the engine's steps run in containers.<engine> (else in its environment here)."""
    if conv.engine == "megatron":
        return _bridge_steps(conv, containerised)
    if conv.convert_to == "hf":
        return [_here("to-hf", "TensorRT-LLM checkpoint {input} -> HF {partial}", _to_hf), _tokenizer_step()]
    out = []
    if conv.torch_dtype == "fp8":
        out.append(Step("calibrate", script=lambda f: _calibrate(conv, f), env={
            "SERVEGEN_TRTLLM_EXAMPLES": TRTLLM_EXAMPLES_DEFAULT}))
    else:
        out.append(_here("checkpoint", f"HF {{input}} -> TensorRT-LLM checkpoint {{checkpoint}} (tp {conv.tp}, "
                         f"pp {conv.pp}, {conv.torch_dtype})", lambda f: _checkpoint(conv, f)))
    if conv.builds_engine:
        out.append(Step("engine", script=lambda f: _trtllm_build(conv, f)))
    return out + [_tokenizer_step()]


def checkpoint_folder(conv: Conversion, partial: str) -> str:
    return partial if conv.checkpoint_only else f"{partial}/{CHECKPOINT}"


def _here(name: str, what: str, fn: Callable[[Folders], None]) -> Step:
    def line(f: Folders) -> str:
        return what.format(input=f.input, partial=f.partial, checkpoint=f"{f.partial}/{CHECKPOINT}")

    return Step(name, here=fn, what=line)


def _checkpoint(conv: Conversion, f: Folders) -> None:
    from servegen.conversion.trtllm import hf_to_trtllm  # torch: only where it runs

    target = f.partial_here if conv.checkpoint_only else f.partial_here / CHECKPOINT
    target.mkdir(exist_ok=True)
    hf_to_trtllm(f.input_here, target, tp=conv.tp, pp=conv.pp, dtype=conv.torch_dtype)


def _to_hf(f: Folders) -> None:
    from servegen.conversion.trtllm import trtllm_to_hf

    trtllm_to_hf(f.input_here, f.partial_here)


def _calibrate(conv: Conversion, f: Folders) -> str:
    """ModelOpt's fp8 calibration through TensorRT-LLM's quantize.py, as NeMo-Skills runs it."""
    script = '"$SERVEGEN_TRTLLM_EXAMPLES"/quantization/quantize.py'
    argv = ["python3", script, "--model_dir", f.input, "--dtype", "bfloat16", "--qformat", "fp8",
            "--kv_cache_dtype", "fp8", "--calib_dataset", conv.calib_dataset, "--calib_size", str(conv.calib_size),
            "--tp_size", str(conv.tp), "--pp_size", str(conv.pp), "--output_dir", checkpoint_folder(conv, f.partial)]
    check = (f"[ -f {script} ] || {{ echo \"servegen: $SERVEGEN_TRTLLM_EXAMPLES/quantization/quantize.py is not "
             "in this environment; set SERVEGEN_TRTLLM_EXAMPLES to TensorRT-LLM's examples folder (or use an image, "
             f"containers.trtllm, that has it at {TRTLLM_EXAMPLES_DEFAULT})\" >&2; exit 1; }}")
    return check + "\n" + " ".join([argv[0], script, *map(shlex.quote, argv[2:])])  # the variable unquoted: expanded


def _trtllm_build(conv: Conversion, f: Folders) -> str:
    argv = ["trtllm-build", "--checkpoint_dir", checkpoint_folder(conv, f.partial), "--output_dir", f.partial,
            "--gemm_plugin", "auto", "--use_paged_context_fmha", "enable"]
    if conv.torch_dtype != "fp8":
        argv += ["--gpt_attention_plugin", conv.torch_dtype]
    argv += ["--max_batch_size", str(conv.max_batch_size), "--max_input_len", str(conv.max_input_len),
             "--max_seq_len", str(conv.max_seq_len), "--max_num_tokens", str(conv.max_num_tokens)]
    if conv.tp * conv.pp > 1:
        argv += ["--workers", str(conv.job_gpus)]  # the ranks' engines built in parallel, one per GPU
    argv += shlex.split(conv.build_args)
    return shlex.join(argv) + f" && rm -rf {shlex.quote(f.partial + '/' + CHECKPOINT)}"


def _tokenizer_step() -> Step:
    return _here("tokenizer", "the tokenizer files of {input} copied beside the output", _copy_tokenizer)


def _copy_tokenizer(f: Folders) -> None:
    for name in TOKENIZER_FILES:
        source = f.input_here / name
        if source.is_file() and not (f.partial_here / name).exists():
            shutil.copy2(source, f.partial_here / name)


def _bridge_steps(conv: Conversion, containerised: bool) -> list[Step]:
    """Megatron-Bridge's script copied into the partial folder (a container sees it there), then
    run by the bridge's Python: python3 in containers.megatron, else the bridge's venv here. The
    script brings the tokenizer too (a checkpoint keeps it in iter_<N>/tokenizer/)."""
    direction = "hf_to_megatron" if conv.convert_to == "megatron" else "megatron_to_hf"

    def copy_scripts(f: Folders) -> None:
        from servegen.conversion.megatron.bridge import SCRIPT_FILES

        (f.partial_here / BRIDGE_SCRIPTS).mkdir(exist_ok=True)
        for path in SCRIPT_FILES:
            shutil.copy2(path, f.partial_here / BRIDGE_SCRIPTS / path.name)

    def script(f: Folders) -> str:
        from servegen.conversion.megatron.bridge import bridge_argv, bridge_python

        python = "python3" if containerised else bridge_python()
        argv = bridge_argv(direction, f.input, f.partial, python, f"{f.partial}/{BRIDGE_SCRIPTS}",
                           dtype=conv.torch_dtype)
        return shlex.join(argv) + f" && rm -rf {shlex.quote(f.partial + '/' + BRIDGE_SCRIPTS)}"

    return [_here("bridge-script", f"Megatron-Bridge's script copied into {{partial}}/{BRIDGE_SCRIPTS}", copy_scripts),
            Step(direction, script=script)]
