"""TensorRT-LLM's OpenAI-compatible server, `trtllm-serve`.

Follows the trtllm-serve command reference (TensorRT-LLM docs/source/commands/trtllm-serve,
tensorrt_llm/commands/serve.py, 1.x): `trtllm-serve MODEL --host --port --tp_size`, the PyTorch
backend for a Hugging Face checkpoint (its default in 1.x, named so that older releases, whose
default was the TensorRT engine, do the same) and --backend tensorrt for a folder of built
engines. Tensor parallel over every GPU of every node, as the multi-node example does; an
engine folder (as `servegen convert` builds it: the engines, their config.json, the tokenizer
copied beside them) is served with the tp/pp it was built for, and needs exactly that many GPUs.

More than one GPU: one MPI task per GPU, each running `trtllm-llmapi-launch trtllm-serve ...`;
rank 0 serves HTTP and the others become its workers. The cluster layer starts the tasks (mpirun
here, srun on Slurm, where TensorRT-LLM's example adds --mpi=pmix). Readiness: /health, which
answers once the model is loaded.

GPU only. TensorRT-LLM was NOT run here (no GPU on these machines): golden-tested only.
"""

import glob
import json
import os

from servegen.errors import ServegenError
from servegen.server.command import ServerCommand, ServerSpec, has_flag, join, parallel_sizes, with_defaults

TP_FLAGS = ("--tp_size", "--tensor_parallel_size")
PP_FLAGS = ("--pp_size", "--pipeline_parallel_size")


def build_command(spec: ServerSpec) -> ServerCommand:
    if spec.gpus == 0:
        raise ServegenError("trtllm needs GPUs (--server_gpus 1 or more); use --server_type vllm or hf on CPU")
    engine = _engine_mapping(spec.model)
    tp, pp = _engine_sizes(spec, engine) if engine else parallel_sizes(spec, TP_FLAGS, PP_FLAGS, default_pp=1)
    argv = ["trtllm-serve", spec.model, "--host", spec.host, "--port", str(spec.port)]
    argv += with_defaults(spec.args, [("--backend", "tensorrt" if engine else "pytorch")])
    if not has_flag(spec.args, *TP_FLAGS):
        argv += ["--tp_size", str(tp)]
    if pp > 1 and not has_flag(spec.args, *PP_FLAGS):
        argv += ["--pp_size", str(pp)]  # the user's --tp_size leaves GPUs for pipeline stages
    argv += spec.args
    tasks = spec.gpus
    if spec.gpus * spec.nodes > 1:
        # The launcher runs its command from an unquoted string: words split again, globs expand.
        broken = [a for a in argv if any(c.isspace() or c in "*?[" for c in a)]
        if broken:
            raise ServegenError(
                f"trtllm-llmapi-launch re-splits its command on spaces, so {broken[0]!r} cannot reach "
                "trtllm-serve on several GPUs; use a path or value without spaces, *, ? or ["
            )
        argv = ["trtllm-llmapi-launch", *argv]
    return ServerCommand(script=join(argv), tasks_per_node=tasks, mpi=tasks > 1)


def _engine_mapping(model: str) -> dict | None:
    """The mapping (tp_size, pp_size, world_size) of a folder built by trtllm-build (rank<N>.engine
    files beside its config.json), or None for anything else (a checkpoint, a folder not here)."""
    if not glob.glob(os.path.join(glob.escape(model), "rank*.engine")):
        return None
    try:
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f)["pretrained_config"]["mapping"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ServegenError(f"--model {model} has engines but no readable config.json beside them "
                            "(trtllm-build writes one); rebuild it") from None


def _engine_sizes(spec: ServerSpec, mapping: dict) -> tuple[int, int]:
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    if tp * pp != spec.gpus * spec.nodes:
        raise ServegenError(
            f"--model {spec.model} is an engine built for {tp * pp} GPUs (tp {tp}, pp {pp}); give --server_gpus "
            f"and --server_nodes that make {tp * pp}, not {spec.gpus} x {spec.nodes}"
        )
    if has_flag(spec.args, *TP_FLAGS, *PP_FLAGS):
        raise ServegenError(f"--model {spec.model} is an engine: its tp and pp are the ones it was built with; "
                            "leave --tp_size/--pp_size out of --server_args")
    if not has_flag(spec.args, "--tokenizer") and not any(
            os.path.isfile(os.path.join(spec.model, name)) for name in ("tokenizer.json", "tokenizer.model")):
        raise ServegenError(f"--model {spec.model} is an engine without a tokenizer beside it: copy the model's "
                            "tokenizer files into it (servegen convert does) or pass --server_args '--tokenizer DIR'")
    return tp, pp
