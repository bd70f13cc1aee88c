"""What a conversion is asked to do: `servegen convert`'s flags, declared once here (type,
default, help), with the checks that need no file. NeMo-Skills' `ns convert` names, plus
--checkpoint_only."""

from dataclasses import dataclass, field, fields

from servegen.errors import ConversionError

# (from, to) -> the engine whose container (containers.<engine>) runs its steps
PAIRS = {("hf", "trtllm"): "trtllm", ("trtllm", "hf"): "trtllm", ("hf", "megatron"): "megatron",
         ("megatron", "hf"): "megatron"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "fp8"}
# --model_type -> the Hugging Face architectures it names
MODEL_TYPES = {"llama": ("LlamaForCausalLM", "MistralForCausalLM"), "qwen": ("Qwen2ForCausalLM",)}


def _flag(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, "argparse": argparse_kwargs})


@dataclass(frozen=True)
class Conversion:
    input_model: str = _flag(None, "the model folder to convert (as the engine's container sees it)", required=True)
    output_model: str = _flag(None, "the folder to write; written beside it, then renamed when complete",
                              required=True)
    convert_from: str = _flag(None, "the input's format", required=True, choices=("hf", "trtllm", "megatron"))
    convert_to: str = _flag(None, "the output's format", required=True, choices=("trtllm", "megatron", "hf"))
    model_type: str | None = _flag(None, "the model family, checked against the input's architecture",
                                   choices=tuple(MODEL_TYPES))
    dtype: str | None = _flag(None, "weights of the output (default bf16; to hf: the input's)", choices=tuple(DTYPES))
    num_gpus: int | None = _flag(None, "tensor-parallel size of a TensorRT-LLM output and the GPUs of the job "
                                 "(default 1; to or from megatron: 0, on CPU)", type=int)
    num_nodes: int = _flag(1, "pipeline-parallel size of a TensorRT-LLM output (the job runs on one node)", type=int)
    max_batch_size: int = _flag(512, "trtllm-build --max_batch_size", type=int)
    max_input_len: int = _flag(4096, "trtllm-build --max_input_len", type=int)
    max_seq_len: int = _flag(8192, "trtllm-build --max_seq_len", type=int)
    max_num_tokens: int = _flag(8192, "trtllm-build --max_num_tokens", type=int)
    build_args: str = _flag("", "more trtllm-build flags, appended last so they win")
    calib_dataset: str = _flag("cnn_dailymail", "fp8 calibration data: a dataset name or folder (quantize.py's)")
    calib_size: int = _flag(512, "fp8 calibration samples", type=int)
    checkpoint_only: bool = _flag(False, "stop after the TensorRT-LLM checkpoint (no GPU needed unless fp8)",
                                  action="store_true")

    @property
    def engine(self) -> str:
        return PAIRS[(self.convert_from, self.convert_to)]

    @property
    def tp(self) -> int:
        return 1 if self.num_gpus is None else self.num_gpus

    @property
    def pp(self) -> int:
        return self.num_nodes

    @property
    def torch_dtype(self) -> str | None:
        """bfloat16/float16/float32/fp8, or None: the input's own (a conversion to hf)."""
        if self.dtype is None:
            return None if self.convert_to == "hf" else "bfloat16"
        return DTYPES[self.dtype]

    @property
    def builds_engine(self) -> bool:
        return self.convert_to == "trtllm" and not self.checkpoint_only

    @property
    def job_gpus(self) -> int:
        """GPUs the job asks for: TensorRT-LLM's build and calibration need them; servegen's own
        checkpoint steps do not, nor Megatron-Bridge, which converts on the CPU unless given some."""
        if self.convert_to == "trtllm" and (self.builds_engine or self.torch_dtype == "fp8"):
            return self.tp
        if self.engine == "megatron":
            return self.num_gpus or 0
        return 0

    def check(self) -> "Conversion":
        """The mistakes visible in the flags alone, one line each."""
        pair = (self.convert_from, self.convert_to)
        if pair not in PAIRS:
            known = ", ".join(f"{a} -> {b}" for a, b in PAIRS)
            raise ConversionError(f"cannot convert {pair[0]} -> {pair[1]}; servegen converts {known}")
        if self.convert_to == "hf" and self.dtype is not None:
            raise ConversionError("--dtype is for --convert_to trtllm or megatron; a conversion to hf keeps "
                                  "the input's dtype")
        if self.convert_to == "megatron" and self.dtype == "fp8":
            raise ConversionError("--dtype fp8 is TensorRT-LLM's (ModelOpt calibration); a Megatron checkpoint "
                                  "takes bf16, fp16 or fp32")
        if self.checkpoint_only and self.convert_to != "trtllm":
            raise ConversionError("--checkpoint_only stops after the TensorRT-LLM checkpoint: it needs --convert_to trtllm")
        if self.engine == "megatron" and self.num_nodes != 1:
            raise ConversionError("--num_nodes is the pipeline-parallel size of a TensorRT-LLM checkpoint; "
                                  "a Megatron checkpoint is resharded when it is loaded")
        if self.num_gpus is not None and self.num_gpus < (1 if self.convert_to == "trtllm" else 0):
            raise ConversionError(f"--num_gpus must be {'1' if self.convert_to == 'trtllm' else '0'} or more, "
                                  f"got {self.num_gpus}")
        if self.num_nodes < 1:
            raise ConversionError(f"--num_nodes must be 1 or more, got {self.num_nodes}")
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "calib_size"):
            if getattr(self, name) < 1:
                raise ConversionError(f"--{name} must be 1 or more, got {getattr(self, name)}")
        if self.max_input_len > self.max_seq_len:
            raise ConversionError(f"--max_input_len {self.max_input_len} is more than --max_seq_len {self.max_seq_len}")
        return self

    def argv(self) -> list[str]:
        """The flags that give this conversion again (for the job's command)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == f.default and not f.metadata["argparse"].get("required"):
                continue
            if isinstance(value, bool):
                out.append(f"--{f.name}")
            else:
                out += [f"--{f.name}", str(value)]
        return out


FIELDS = fields(Conversion)
