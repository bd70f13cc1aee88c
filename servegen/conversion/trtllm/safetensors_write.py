"""A safetensors file written as a stream: the header first (every tensor declared up front),
then each tensor's bytes in chunks of rows, each put straight into the writer's buffer, so that
no tensor is ever whole in memory and no byte is copied more than it must be."""

import errno
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from servegen.conversion.trtllm.safetensors_read import DTYPES
from servegen.errors import ConversionError

NAMES = {dtype: name for name, dtype in DTYPES.items()}
_BLOCK, _STAGE = 4096, 32 * 1024 * 1024  # O_DIRECT's alignment; the bytes gathered per write
_SPARE_STAGES: list[mmap.mmap] = []  # kept for the next file: fresh memory is slow to fault in here


class StreamingWriter:
    """Writes the tensors declared (name, dtype, shape, in order), each from its chunks. The file
    is written under a `.partial` name and renamed once every byte declared has come, so that a
    stopped conversion never leaves a file that looks complete."""

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        self._sizes, offset = [], 0
        for name, dtype, shape in tensors:
            size = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append((name, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data aligned to 8 bytes, as safetensors writes it
        self.path, self._partial = path, path.with_name(path.name + ".partial")
        self._file = SequentialFile(self._partial)
        head = struct.pack("<Q", len(text)) + text
        for at in range(0, len(head), _STAGE // 2):  # a header may outgrow one buffer
            piece = head[at : at + _STAGE // 2]
            self._file.reserve(len(piece))[:] = piece
        self._next = 0

    def write(self, name: str, chunks: Iterable[tuple[int, Callable[[memoryview], None]]]) -> None:
        """The next declared tensor's bytes, in chunks (size, fill): fill(buffer) puts size bytes there."""
        expected, size = self._sizes[self._next]
        assert name == expected, f"{name} written where {expected} was declared"
        written = 0
        for chunk_size, fill in chunks:
            fill(self._file.reserve(chunk_size))
            written += chunk_size
        assert written == size, f"{name}: {written} bytes written, {size} declared"
        self._next += 1

    def close(self) -> None:
        complete = self._next == len(self._sizes)
        try:
            self._file.close()
        except BaseException:
            complete = False
            raise
        finally:
            if complete:
                os.replace(self._partial, self.path)
            else:
                self._partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SequentialFile:
    """A file written front to back, with O_DIRECT where the filesystem takes it (else plain
    writes), through two aligned buffers: a thread writes one while the caller fills the other.
    Why O_DIRECT: the bytes are not read again soon, and on this project's VMs filling fresh
    page-cache pages ran at 0.3-0.5 GB/s against 1.6 GB/s direct; a checkpoint of 100s of GB
    then does not evict the page cache either."""

    def __init__(self, path: Path):
        self._path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd, self._direct = os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fd, self._direct = os.open(path, flags, 0o644), False
        # page-aligned, as O_DIRECT needs
        self._stages = [_SPARE_STAGES.pop() if _SPARE_STAGES else mmap.mmap(-1, _STAGE) for _ in range(2)]
        self._filled = self._offset = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def reserve(self, size: int) -> memoryview:
        """The next size bytes of the file, as a buffer for the caller to fill now."""
        if size > _STAGE - _BLOCK:
            raise ConversionError(f"{self._path}: a row of {size} bytes does not fit the {_STAGE}-byte write buffer")
        if self._filled + size > _STAGE:  # write what is whole in blocks; the rest starts the next buffer
            whole = self._filled - self._filled % _BLOCK
            rest = bytes(self._stages[0][whole : self._filled])
            self._flush(whole)
            self._stages[0][: len(rest)] = rest
            self._filled = len(rest)
        view = memoryview(self._stages[0])[self._filled : self._filled + size]
        self._filled += size
        return view

    def close(self) -> None:
        """The last bytes, padded to the block size for O_DIRECT and cut back to the true size."""
        size = self._offset + self._filled
        padded = self._filled + (-self._filled % _BLOCK if self._direct else 0)
        self._stages[0][self._filled : padded] = bytes(padded - self._filled)
        try:
            self._flush(padded)
            self._wait()
            os.ftruncate(self._fd, size)
        finally:
            os.close(self._fd)
            _SPARE_STAGES[:] = self._stages

    def _flush(self, size: int) -> None:
        """Hands the filled buffer to a writing thread, once the one before is done."""
        self._wait()
        self._thread = threading.Thread(target=self._pwrite, args=(memoryview(self._stages[0])[:size], self._offset))
        self._thread.start()
        self._stages.reverse()
        self._filled, self._offset = 0, self._offset + size

    def _pwrite(self, view: memoryview, offset: int) -> None:
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            self._error = e

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
