"""The two conversions, HF -> TensorRT-LLM checkpoint and back: check everything first, then
write each rank file (or model.safetensors) tensor by tensor, a chunk of rows at a time, and
config.json last, so that a folder with a config.json is complete."""

import json
from pathlib import Path

import torch

from servegen.conversion.trtllm.hf import SINGLE, check_parallel, hf_config, read_hf_model, read_json
from servegen.conversion.trtllm.layout import hf_tensors, rank_tensors
from servegen.conversion.trtllm.pieces import Planned, fills, prefetch
from servegen.conversion.trtllm.safetensors_read import RowReader, StoredTensor, read_header
from servegen.conversion.trtllm.safetensors_write import StreamingWriter
from servegen.conversion.trtllm.trt_config import read_trtllm_config, trtllm_config
from servegen.errors import ConversionError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def hf_to_trtllm(src: Path, dst: Path, tp: int, pp: int, dtype: str, use_parallel_embedding: bool = False) -> None:
    """Writes the HF model at src as a TensorRT-LLM checkpoint into the empty folder dst:
    config.json and rank{pp_rank * tp + tp_rank}.safetensors for each of the tp x pp ranks."""
    src, dst = Path(src), Path(dst)
    name = _dtype_name(dtype)
    model = read_hf_model(src, tp, pp)
    _check_empty(dst)
    with RowReader() as reader:
        for rank in range(tp * pp):
            tensors = rank_tensors(model.shape, model.tensors, tp, pp, rank, use_parallel_embedding)
            _write(reader, dst / f"rank{rank}.safetensors", tensors, DTYPES[name])
    config = trtllm_config(model.shape, tp, pp, name, use_parallel_embedding)
    (dst / "config.json").write_text(json.dumps(config, indent=4) + "\n")


def trtllm_to_hf(src: Path, dst: Path) -> None:
    """Writes the TensorRT-LLM checkpoint at src back as an HF folder (config.json and
    model.safetensors) into the empty folder dst: tp splits joined, lm_head's padding rows
    dropped, kv heads repeated over ranks taken once; bytes unchanged, dtype kept."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such checkpoint folder; pass the folder with config.json and rank*.safetensors")
    config = read_json(src / "config.json", f"{src}: no config.json; a TensorRT-LLM checkpoint needs its config.json")
    shape, tp, pp = read_trtllm_config(src, config)
    check_parallel(src / "config.json", shape, tp, pp)
    dtype = DTYPES.get(config.get("dtype"))
    if dtype is None:
        raise ConversionError(f"{src / 'config.json'}: dtype {config.get('dtype')} is not one of {', '.join(DTYPES)}")
    ranks = [_rank_file(src, rank) for rank in range(tp * pp)]
    _check_empty(dst)
    try:
        tensors = hf_tensors(shape, ranks, tp, pp, config.get("use_parallel_embedding", False))
    except KeyError as e:
        raise ConversionError(f"{src}: a rank file lacks {e.args[0]}; the checkpoint is partial") from None
    with RowReader() as reader:
        _write(reader, dst / SINGLE, tensors, dtype, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config(shape, config["dtype"]), indent=2) + "\n")


def _write(reader: RowReader, path: Path, tensors: list[Planned], dtype: torch.dtype, metadata: dict | None = None) -> None:
    with StreamingWriter(path, [(t.name, dtype, t.shape) for t in tensors], metadata) as writer:
        for i, t in enumerate(tensors):
            if i + 1 < len(tensors):  # the disk reads the next tensor while this one is written
                prefetch(reader, tensors[i + 1])
            writer.write(t.name, fills(reader, t, dtype))


def _rank_file(src: Path, rank: int) -> dict[str, StoredTensor]:
    path = src / f"rank{rank}.safetensors"
    if not path.is_file():
        raise ConversionError(f"{src}: no rank{rank}.safetensors; config.json's mapping needs one file per rank")
    return read_header(path)


def _dtype_name(dtype: str) -> str:
    name = ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConversionError(f"dtype {dtype} is not supported; use one of {', '.join([*DTYPES, *ALIASES])}")
    return name


def _check_empty(dst: Path) -> None:
    if not dst.is_dir():
        raise ConversionError(f"{dst}: no such folder; create the (empty) output folder first")
    if any(dst.iterdir()):
        raise ConversionError(f"{dst}: the output folder is not empty; pass an empty folder")
