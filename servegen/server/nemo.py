"""NeMo's and Megatron-LM's text generation servers (REST, not OpenAI-compatible: PUT a JSON body).

NeMo: `megatron_gpt_eval.py ... server=True` from NeMo's examples/nlp/language_modeling (the
Megatron GPT inference script of the NeMo 1.x/2.x NLP collection; Hydra overrides, config
conf/megatron_gpt_inference.yaml) serving a .nemo file or folder. PyTorch Lightning runs one
process per GPU: one task per GPU (Slurm's tasks under srun, MPI's under mpirun, which needs
mpi4py as NeMo's containers have it). Tensor parallel = GPUs per node, pipeline parallel = nodes,
as servegen's vLLM command does. Readiness: PUT /generate of a one-token request.

Megatron-LM: tools/run_text_generation_server.py launched by torchrun, as Megatron-LM's
examples/inference/run_text_generation_server_*.sh did before they were removed (torchrun starts
one process per GPU, and its --nnodes/--node_rank/--master_addr/--master_port join the nodes), so
one task per node; the master port is one of head_ports (NeMo's Lightning derives its own from
the Slurm job id). (Megatron-LM's README now points to examples/inference/launch_inference_server.py,
an OpenAI-style server on its dynamic engine: server type megatron_openai, megatron_openai.py,
started by the same torchrun command, megatron_torchrun.) The architecture comes from the
checkpoint: Megatron-LM's own saves keep its arguments (--use-checkpoint-args; tokenizer flags
--tokenizer-type, --tokenizer-model, ... from the user's --server_args), a Megatron-Bridge
checkpoint (servegen convert --convert_to megatron) has its run_config.yaml, from which the
model, tokenizer and format flags are derived (megatron_checkpoint.py). Readiness: PUT /api of a one-token
request.

Both scripts listen on 0.0.0.0 whatever --server_host says (they have no host setting) and are
looked up where NVIDIA's containers keep them, $SERVEGEN_NEMO_DIR=/opt/NeMo and
$SERVEGEN_MEGATRON_DIR=/opt/Megatron-LM unless set otherwise; a script that is not there fails
the task with one line saying so (NeMo's is only in images from before NeMo removed its NLP
collection in 2026, e.g. nemo:25.07). GPU only. Neither was run here
(no GPU on these machines): golden-tested only.
"""

import json

from servegen.errors import ServegenError
from servegen.server.megatron_checkpoint import bridge_iteration, model_flags
from servegen.overrides import hydra_value
from servegen.server.command import (
    MASTER_PORT,
    ServerCommand,
    ServerSpec,
    has_flag,
    join,
    parallel_sizes,
    require_file,
    with_defaults,
)

NEMO_SCRIPT = '"$SERVEGEN_NEMO_DIR"/examples/nlp/language_modeling/megatron_gpt_eval.py'
MEGATRON_SCRIPT = '"$SERVEGEN_MEGATRON_DIR"/tools/run_text_generation_server.py'
MEGATRON_MASTER_PORT = 6000  # the torch.distributed port of Megatron-LM's examples
# where NVIDIA's containers keep Megatron-LM; CUDA_DEVICE_MAX_CONNECTIONS=1 as Megatron-LM's examples export it
MEGATRON_ENV = {"SERVEGEN_MEGATRON_DIR": "/opt/Megatron-LM", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
NEMO_MISSING = (
    "$SERVEGEN_NEMO_DIR/examples/nlp/language_modeling/megatron_gpt_eval.py is not in this environment: "
    "NeMo's text generation server exists only in NeMo images that still have the NLP collection "
    "(NeMo removed it in 2026); use such an image (containers.nemo) or set SERVEGEN_NEMO_DIR to a NeMo checkout that has it"
)
MEGATRON_MISSING = (
    "$SERVEGEN_MEGATRON_DIR/tools/run_text_generation_server.py is not in this environment; "
    "set SERVEGEN_MEGATRON_DIR to the Megatron-LM checkout (or use an image, containers.megatron, that has it at /opt/Megatron-LM)"
)


def build_command(spec: ServerSpec) -> ServerCommand:
    _need_gpus(spec)
    tp_keys, pp_keys = _hydra_names("tensor_model_parallel_size"), _hydra_names("pipeline_model_parallel_size")
    tp, pp = parallel_sizes(spec, tp_keys, pp_keys, spec.nodes)
    overrides = [
        ("gpt_model_file", hydra_value(spec.model)),
        ("trainer.devices", str(spec.gpus)),
        ("trainer.num_nodes", str(spec.nodes)),
        ("tensor_model_parallel_size", str(tp)),
        ("pipeline_model_parallel_size", str(pp)),
        ("server", "True"),
        ("port", str(spec.port)),
    ]
    argv = ["python3", NEMO_SCRIPT]
    argv += [f"{key}={value}" for key, value in overrides if not has_flag(spec.args, *_hydra_names(key))]
    return ServerCommand(
        script=require_file(NEMO_SCRIPT, NEMO_MISSING) + join(argv + list(spec.args)),
        env={"SERVEGEN_NEMO_DIR": "/opt/NeMo"},
        tasks_per_node=spec.gpus,
        health_path="/generate",
        health_method="PUT",
        health_body=json.dumps({"sentences": ["ping"], "tokens_to_generate": 1, "greedy": True}),
    )


def build_megatron_command(spec: ServerSpec) -> ServerCommand:
    argv = megatron_torchrun(spec, MEGATRON_SCRIPT) + with_defaults(spec.args, [("--port", str(spec.port))])
    return ServerCommand(
        script=require_file(MEGATRON_SCRIPT, MEGATRON_MISSING) + join(argv + list(spec.args)),
        env=dict(MEGATRON_ENV),
        head_ports={MASTER_PORT: MEGATRON_MASTER_PORT},
        health_path="/api",
        health_method="PUT",
        health_body=json.dumps({"prompts": ["ping"], "tokens_to_generate": 1}),
    )


def megatron_torchrun(spec: ServerSpec, script: str) -> list[str]:
    """torchrun running a Megatron-LM server script on every GPU of this node (joining the head's
    on several nodes) with the checkpoint and the parallel sizes; the server's own flags and the
    user's args follow."""
    _need_gpus(spec)
    tp_flags, pp_flags = ("--tensor-model-parallel-size",), ("--pipeline-model-parallel-size",)
    tp, pp = parallel_sizes(spec, tp_flags, pp_flags, spec.nodes)
    argv = ["torchrun", "--nproc_per_node", str(spec.gpus)]
    if spec.nodes > 1:
        argv += ["--nnodes", str(spec.nodes), "--node_rank", "$SERVEGEN_NODE_RANK", "--master_addr", "$SERVEGEN_HEAD_HOST"]
    argv += ["--master_port", f"${MASTER_PORT}"]  # on one node too: torchrun's default, 29500, is fixed
    argv += [script, "--load", spec.model]
    step = bridge_iteration(spec.model)
    argv += ["--use-checkpoint-args"] if step is None else with_defaults(spec.args, model_flags(spec.model, step))
    argv += [] if has_flag(spec.args, *tp_flags) else [tp_flags[0], str(tp)]
    argv += [] if has_flag(spec.args, *pp_flags) else [pp_flags[0], str(pp)]
    # Megatron's argument checks need a micro batch size even though nothing trains.
    return argv + with_defaults(spec.args, [("--micro-batch-size", "1")])


def _need_gpus(spec: ServerSpec) -> None:
    if spec.gpus == 0:
        raise ServegenError(
            f"{spec.server_type} needs GPUs (--server_gpus 1 or more); use --server_type vllm or hf on CPU"
        )


def _hydra_names(key: str) -> tuple[str, ...]:
    """A Hydra key as the user may override it: key=v, +key=v (add) or ++key=v (add or override)."""
    return key, "+" + key, "++" + key
