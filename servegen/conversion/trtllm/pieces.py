"""An output tensor described as pieces of stored ones (row ranges, column ranges, rows of zeros),
and its bytes produced a chunk of rows at a time."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from servegen.conversion.trtllm.safetensors_read import RowReader, StoredTensor

CHUNK_BYTES = 16 * 1024 * 1024  # rows read at once, at most (or one row, if a row is larger)
Fill = Callable[[memoryview], None]


@dataclass(frozen=True)
class Part:
    """Rows [first, stop) of a stored tensor, their columns [cols[0], cols[1]) (None: all); with
    no source, that many rows of zeros (padding)."""

    source: StoredTensor | None
    first: int
    stop: int
    cols: tuple[int, int] | None = None

    @property
    def width(self) -> int | None:
        if self.cols is not None:
            return self.cols[1] - self.cols[0]
        return self.source.shape[1] if self.source is not None and len(self.source.shape) == 2 else None


@dataclass(frozen=True)
class Planned:
    """One tensor to write: blocks of rows, top to bottom, each block its parts side by side."""

    name: str
    blocks: tuple[tuple[Part, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        rows = sum(block[0].stop - block[0].first for block in self.blocks)
        widths = [sum(p.width for p in block) for block in self.blocks if block[0].width is not None]
        return (rows, widths[0]) if widths else (rows,)


def stacked(name: str, *parts: Part) -> Planned:
    """Parts one above the other (a split along dim 0, undone or done)."""
    return Planned(name, tuple((p,) for p in parts if p.stop > p.first))


def side_by_side(name: str, *parts: Part) -> Planned:
    """Parts next to each other (a split along dim 1, undone)."""
    return Planned(name, (tuple(parts),))


def fills(reader: RowReader, tensor: Planned, dtype: torch.dtype) -> Iterator[tuple[int, Fill]]:
    """The tensor's bytes in dtype, in order, a chunk of rows at a time: (size, fill), where
    fill(buffer) puts the chunk's size bytes into buffer (the writer's own)."""
    width = tensor.shape[1] if len(tensor.shape) == 2 else None
    for block in tensor.blocks:
        rows = block[0].stop - block[0].first
        row_bytes = sum(p.source.row_bytes if p.source is not None else (width or 1) * dtype.itemsize for p in block)
        step = max(1, CHUNK_BYTES // row_bytes)
        for at in range(0, rows, step):
            n = min(step, rows - at)
            yield n * (width or 1) * dtype.itemsize, partial(_fill, reader, block, at, n, width, dtype)


def prefetch(reader: RowReader, tensor: Planned) -> None:
    """Starts the disk reading every stored row the tensor is made of."""
    for block in tensor.blocks:
        for part in block:
            if part.source is not None:
                reader.prefetch(part.source, part.first, part.stop)


def _fill(
    reader: RowReader, block: tuple[Part, ...], at: int, n: int, width: int | None, dtype: torch.dtype, buffer: memoryview
) -> None:
    """Rows [at, at + n) of a block into buffer: read there straight, where they need no change,
    else read into the reader's buffers and copied over (columns cut, parts side by side, dtype
    converted)."""
    only = block[0]
    if len(block) == 1 and only.source is not None and only.cols is None and only.source.dtype == dtype:
        return reader.read_into(only.source, only.first + at, only.first + at + n, buffer)
    out = torch.frombuffer(buffer, dtype=dtype)
    out = out.view(n, width) if width is not None else out
    if only.source is None:
        return out.zero_()
    column = 0
    for slot, part in enumerate(block):
        rows = reader.rows(part.source, part.first + at, part.first + at + n, slot)
        if width is None:
            out.copy_(rows)
            continue
        if part.cols is not None:
            rows = rows[:, part.cols[0] : part.cols[1]]
        out[:, column : column + rows.shape[1]].copy_(rows)
        column += rows.shape[1]
