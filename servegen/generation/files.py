"""The files of a generation job: the input streamed row by row with line numbers, the output
written in input order and flushed row by row, resume from what a killed run left, chunk merge.

While a job runs, its output file holds a contiguous prefix of the finished rows in input order.
A row that finishes before an earlier one goes to a side file (`<output>.unordered`) at once and
moves into the output when the rows before it are done; so a crash loses only the requests in
flight, and a resume knows exactly which rows are done: the output's prefix plus the side file.
The side file is emptied whenever every row in it has reached the output, so it stays small, and
a resume never holds more rows in memory than the side file has past the output's end.
"""

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from servegen.errors import ServegenError

INDEX_KEY = "_servegen_row"  # the row's position, in side-file records {INDEX_KEY: i, "row": {...}}
_SIDE_INDEX = re.compile(rb'\{"_servegen_row": (\d+),')  # how a side record starts (no need to parse it all)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # \ud800-\udfff: a surrogate pair, or half of one


def done_marker(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def count_rows(path: Path) -> int:
    """Rows in a JSONL file (blank lines do not count), without parsing them."""
    rows = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                rows += 1
    return rows


def read_rows(
    path: Path, start: int = 0, stop: int | None = None, skip: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, int, dict]]:
    """(row index, line number, row) for rows start..stop-1 that `skip` (e.g. done rows) does not
    drop, parsed only then; a bad line is an error naming it."""
    index = -1
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            index += 1
            if index < start or skip is not None and skip(index):
                continue
            if stop is not None and index >= stop:
                return
            yield index, line_number, parse_row(raw, path, line_number)


def parse_row(raw: bytes, path: Path, line_number: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServegenError(f"{path}:{line_number}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
    text = text.rstrip("\r\n")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        where = "at the end of the line" if e.pos >= len(text.rstrip()) else f"at column {e.colno}"
        raise ServegenError(f"{path}:{line_number}: not valid JSON: {e.msg} {where}") from None
    if not isinstance(row, dict):
        raise ServegenError(f"{path}:{line_number}: a row must be a JSON object, got {type(row).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then look closer
        _check_no_lone_surrogate(row, text, path, line_number)
    return row


def _check_no_lone_surrogate(row: dict, text: str, path: Path, line_number: int) -> None:
    """A \\ud800-style escape with no partner is valid JSON but no character: it cannot be sent
    (a request body is UTF-8) nor written back, so it is a bad line like any other."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        escape = f"\\u{ord(e.object[e.start]):04x}"
        column = text.lower().find(escape) + 1
        where = f" at column {column}" if column else ""
        raise ServegenError(
            f"{path}:{line_number}: {escape}{where} is half of a UTF-16 surrogate pair, not a character"
        ) from None


def _complete_lines(path: Path) -> Iterator[bytes]:
    """The newline-terminated lines of a file, after cutting off a half-written last line."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        good = end
        while good > 0:  # walk back to the last newline
            start = max(0, good - (1 << 16))
            f.seek(start)
            block = f.read(good - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                good = start + cut + 1
                break
            good = start
        if good != end:
            f.truncate(good)
        f.seek(0)
        yield from f


def json_line(row: dict) -> bytes:
    """A row as one line of UTF-8 JSON. A string UTF-8 cannot carry (a lone surrogate, which a
    server's JSON answer can hold) makes the line ASCII JSON with \\u escapes: the same row read back."""
    try:
        return json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(row).encode("ascii")


class OrderedWriter:
    """Writes finished rows of one output file in input order; see the module docstring."""

    def __init__(self, path: Path, first_index: int = 0):
        self.path = Path(path)
        self.side_path = self.path.with_name(self.path.name + ".unordered")
        self.first_index = first_index
        self.next_index = first_index
        self.waiting: dict[int, bytes] = {}  # finished rows not yet in the output, serialized
        self.side_records = 0  # records in the side file
        self.out = None
        self.side = None

    def resume(self) -> int:
        """Open the files, keeping what an earlier run finished; how many rows it finished."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in _complete_lines(self.path):
            self.next_index += 1
        for line in _complete_lines(self.side_path):
            self.side_records += 1
            match = _SIDE_INDEX.match(line)
            index = int(match.group(1)) if match else json.loads(line)[INDEX_KEY]
            if index >= self.next_index:  # the others reached the output before a kill emptied the side file
                self.waiting[index] = json_line(json.loads(line)["row"])
        self.out = open(self.path, "ab")
        self.side = open(self.side_path, "ab")
        self._drain()
        return self.next_index - self.first_index + len(self.waiting)

    def is_done(self, index: int) -> bool:
        return index < self.next_index or index in self.waiting

    def add(self, index: int, row: dict) -> None:
        line = json_line(row)
        if index == self.next_index:
            self.out.write(line + b"\n")
            self.next_index += 1
            self._drain()
            self.out.flush()
        else:
            self.side.write(b'{"%s": %d, "row": %s}\n' % (INDEX_KEY.encode(), index, line))
            self.side.flush()
            self.side_records += 1
            self.waiting[index] = line

    def _drain(self) -> None:
        while self.next_index in self.waiting:
            self.out.write(self.waiting.pop(self.next_index) + b"\n")
            self.next_index += 1
        self.out.flush()
        if not self.waiting and self.side_records:
            # every side record is in the output now (flushed above): a kill from here on
            # leaves either the records, which resume ignores, or none
            self.side.truncate(0)
            self.side_records = 0

    def close(self, complete: bool) -> None:
        """Close the files; when every row is in the output, drop the side file. The caller marks
        the output done (after writing what must exist before the marker, e.g. its summary)."""
        for f in (self.out, self.side):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        if complete:
            if self.waiting:
                raise RuntimeError(f"rows {sorted(self.waiting)[:5]} finished but never reached {self.path}")
            self.side_path.unlink(missing_ok=True)


def merge_lock(final: Path) -> Path:
    return final.with_name(f".{final.name}.merge-lock")


def merge_chunks(final: Path, parts: list[Path], before_done: Callable[[], None] | None = None,
                 with_parts: list[Path] = ()) -> bool:
    """Concatenate finished chunk files into `final` once all are done; True if this call did it.

    Every chunk calls this when it finishes; a file lock makes exactly one of them merge.
    `before_done` runs after the merge, before `final` is marked done. Then the parts and
    `with_parts` (e.g. their summaries) are removed; a call after a merge cut short in that
    clean-up finishes it."""
    lock_path = merge_lock(final)
    merged = False
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done_marker(final).exists():
            if not all(done_marker(p).exists() for p in parts):
                return False
            tmp = final.with_name(final.name + ".merging")
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(1 << 20):
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
            if before_done is not None:
                before_done()
            done_marker(final).write_text("")
            merged = True
        for part in parts:
            done_marker(part).unlink(missing_ok=True)  # the marker first: never a .done without its file
            part.unlink(missing_ok=True)
        for path in with_parts:
            path.unlink(missing_ok=True)
    lock_path.unlink(missing_ok=True)
    return merged
