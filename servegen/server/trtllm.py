"""TensorRT-LLM's OpenAI-compatible server, `trtllm-serve`.

Follows the trtllm-serve command reference (TensorRT-LLM docs/source/commands/trtllm-serve,
tensorrt_llm/commands/serve.py, 1.x): `trtllm-serve MODEL --host --port --tp_size`, the PyTorch
backend for a Hugging Face checkpoint (its default in 1.x, named so that older releases, whose
default was the TensorRT engine, do the same) and --backend tensorrt for a folder of built
engines. Tensor parallel over every GPU of every node, as the multi-node example does.

More than one GPU: one MPI task per GPU, each running `trtllm-llmapi-launch trtllm-serve ...`;
rank 0 serves HTTP and the others become its workers. The cluster layer starts the tasks (mpirun
here, srun on Slurm, where TensorRT-LLM's example adds --mpi=pmix). Readiness: /health, which
answers once the model is loaded.

GPU only. TensorRT-LLM was NOT run here (no GPU on these machines): golden-tested only.
"""

import glob
import os

from servegen.errors import ServegenError
from servegen.server.command import ServerCommand, ServerSpec, has_flag, join, parallel_sizes, with_defaults

TP_FLAGS = ("--tp_size", "--tensor_parallel_size")
PP_FLAGS = ("--pp_size", "--pipeline_parallel_size")


def build_command(spec: ServerSpec) -> ServerCommand:
    if spec.gpus == 0:
        raise ServegenError("trtllm needs GPUs (--server_gpus 1 or more); use --server_type vllm or hf on CPU")
    tp, pp = parallel_sizes(spec, TP_FLAGS, PP_FLAGS, default_pp=1)
    argv = ["trtllm-serve", spec.model, "--host", spec.host, "--port", str(spec.port)]
    argv += with_defaults(spec.args, [("--backend", "tensorrt" if _is_engine_dir(spec.model) else "pytorch")])
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


def _is_engine_dir(model: str) -> bool:
    """A folder built by trtllm-build (rank<N>.engine files) rather than a checkpoint."""
    return bool(glob.glob(os.path.join(glob.escape(model), "rank*.engine")))
