"""Safetensors files read a row range at a time, so that a conversion holds one chunk of rows in
memory, never a whole tensor or file.

The format: an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, offsets counted from the end of the header), then the raw bytes. safetensors' own
`safe_open` maps the file, and every page it touches counts in the process's RSS until the file is
closed (measured here: reading a 400 MB file tensor by tensor took the RSS from 220 to 607 MB),
so rows are read with pread into buffers of their own instead."""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from servegen.errors import ConversionError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: its file, dtype, shape, and first byte in the file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (of one element, for a 1-D tensor)."""
        width = self.shape[1] if len(self.shape) == 2 else 1
        return width * self.dtype.itemsize


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, without reading their data."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _HEADER_LIMIT:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        entries = {name: (e["dtype"], tuple(e["shape"]), e["data_offsets"][0]) for name, e in header.items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e!r}); replace the file") from None
    tensors = {}
    for name, (dtype, shape, offset) in entries.items():
        if dtype not in DTYPES:
            raise ConversionError(f"{path}: tensor {name} is {dtype}; only F32, F16 and BF16 weights convert (no quantized model)")
        tensors[name] = StoredTensor(path, name, DTYPES[dtype], shape, 8 + size + offset)
    return tensors


class RowReader:
    """Reads row ranges of stored tensors, into the caller's memory or into buffers it reuses
    (fresh memory is slow to fault in on these VMs: a buffer per read cost more than the read);
    keeps each file open until closed."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, slot: int, size: int) -> torch.Tensor:
        """size bytes of the slot's buffer: valid until the slot is used again."""
        if slot not in self._buffers or self._buffers[slot].numel() < size:
            self._buffers[slot] = torch.empty(size, dtype=torch.uint8)
        return self._buffers[slot][:size]

    def rows(self, tensor: StoredTensor, first: int, stop: int, slot: int = 0) -> torch.Tensor:
        """Rows [first, stop) (elements, for a 1-D tensor), in the slot's buffer."""
        buffer = self.buffer(slot, (stop - first) * tensor.row_bytes)
        self.read_into(tensor, first, stop, memoryview(buffer.numpy()))
        return buffer.view(tensor.dtype).view(stop - first, *tensor.shape[1:])

    def read_into(self, tensor: StoredTensor, first: int, stop: int, view: memoryview) -> None:
        """Rows [first, stop)'s bytes into view, which holds exactly that many."""
        offset = tensor.start + first * tensor.row_bytes
        while view:
            n = os.preadv(self._fd(tensor), [view], offset)
            if n == 0:
                raise ConversionError(f"{tensor.path}: the file ends inside tensor {tensor.name}; replace the truncated file")
            view, offset = view[n:], offset + n

    def prefetch(self, tensor: StoredTensor, first: int, stop: int) -> None:
        """Has the kernel start reading rows [first, stop), so that reading them later does not wait."""
        offset, size = tensor.start + first * tensor.row_bytes, (stop - first) * tensor.row_bytes
        os.posix_fadvise(self._fd(tensor), offset, size, os.POSIX_FADV_WILLNEED)

    def _fd(self, tensor: StoredTensor) -> int:
        fd = self._fds.get(tensor.path)
        if fd is None:
            fd = self._fds[tensor.path] = os.open(tensor.path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
