"""A job's outputs: one file per unit (a random seed x a chunk), the .done markers that say a file
is complete, the merge of a seed's chunks once all are done, and the one-writer locks."""

import sys
from dataclasses import dataclass
from pathlib import Path

from servegen.errors import ServegenError
from servegen.generation.config import GenerationConfig, setting_name
from servegen.generation.files import done_marker, merge_chunks, merge_lock
from servegen.generation.lock import OutputLocks
from servegen.generation.summary import merge_summaries, summary_path


@dataclass(frozen=True)
class Unit:
    """One output file of the job: a random seed (or none) and a chunk (or the whole dataset)."""

    seed: int | None
    chunk: int | None
    num_chunks: int

    def final_name(self) -> str:
        return "output" + (f"-rs{self.seed}" if self.seed is not None else "") + ".jsonl"

    def file_name(self) -> str:
        if self.chunk is None:
            return self.final_name()
        return self.final_name().replace(".jsonl", f"_chunk{self.chunk}.jsonl")

    def rows(self, total: int) -> tuple[int, int]:
        """The contiguous rows [start, stop) of this chunk."""
        if self.chunk is None:
            return 0, total
        return self.chunk * total // self.num_chunks, (self.chunk + 1) * total // self.num_chunks


def units_of(cfg: GenerationConfig) -> list[Unit]:
    if cfg.num_chunks < 1:
        raise ServegenError(f"{setting_name('num_chunks')} must be 1 or more, got {cfg.num_chunks}")
    chunks: list[int | None] = [None]
    if cfg.num_chunks > 1:
        # each once: two Slurm tasks writing one file would interleave their rows
        chunks = list(range(cfg.num_chunks)) if cfg.chunk_ids is None else list(dict.fromkeys(cfg.chunk_ids))
        bad = [c for c in chunks if not 0 <= c < cfg.num_chunks]
        if bad:
            raise ServegenError(f"{setting_name('chunk_ids')} {bad} are outside 0..{cfg.num_chunks - 1} "
                                f"({setting_name('num_chunks')} {cfg.num_chunks})")
    elif cfg.chunk_ids not in (None, [0]):
        raise ServegenError(f"{setting_name('chunk_ids')} needs {setting_name('num_chunks')} 2 or more")
    seeds = list(dict.fromkeys(cfg.random_seeds)) if cfg.random_seeds is not None else [None]
    if not seeds:
        raise ServegenError(f"{setting_name('random_seeds')} is empty: give at least one seed, or none for output.jsonl")
    return [Unit(seed, chunk, cfg.num_chunks) for seed in seeds for chunk in chunks]


def output_done(out_dir: Path, unit: Unit) -> bool:
    """Whether a unit's output is complete: its part is done, or the parts were merged already."""
    return done_marker(out_dir / unit.file_name()).exists() or done_marker(out_dir / unit.final_name()).exists()


def merge_if_complete(out_dir: Path, unit: Unit) -> None:
    """Merge the chunks of this unit's output if every one is done (the last to finish does it)."""
    final = out_dir / unit.final_name()
    parts = [out_dir / Unit(unit.seed, c, unit.num_chunks).file_name() for c in range(unit.num_chunks)]
    part_summaries = [summary_path(p) for p in parts]
    # the parts' summaries go only after the merged .done: a merge cut short is done again from them
    if merge_chunks(final, parts, before_done=lambda: merge_summaries(summary_path(final), part_summaries),
                    with_parts=part_summaries):
        print(f"servegen: merged {len(parts)} chunks into {final}", file=sys.stderr, flush=True)


def merge_finished(out_dir: Path, units: list[Unit]) -> None:
    """Merge outputs whose chunks are all done but were never merged (a run killed between its
    last chunk's .done and the merge), and finish the clean-up of a merge killed in it."""
    for unit in units:
        if unit.chunk is None or not output_done(out_dir, unit):
            continue
        part, final = out_dir / unit.file_name(), out_dir / unit.final_name()
        left = any(p.exists() for p in (part, done_marker(part), summary_path(part), merge_lock(final)))
        if left or not done_marker(final).exists():
            merge_if_complete(out_dir, unit)


def output_locks(out_dir: Path, units: list[Unit]) -> OutputLocks:
    """The locks that make this process the only writer of these outputs (lock.py)."""
    return OutputLocks([out_dir / u.file_name() for u in units])


def forget_outputs(out_dir: Path, units: list[Unit]) -> None:
    """--rerun_done: drop what earlier runs wrote for these outputs."""
    for name in {u.final_name() for u in units}:
        final = out_dir / name
        chunked = [u for u in units if u.final_name() == name and u.chunk is not None]
        if chunked and len(chunked) < chunked[0].num_chunks and done_marker(final).exists():
            raise ServegenError(f"{final} is already merged; to rerun some of its chunks, rerun all of them")
        for path in (final, done_marker(final), summary_path(final)):
            path.unlink(missing_ok=True)
    for unit in units:
        part = out_dir / unit.file_name()
        for path in (part, done_marker(part), summary_path(part), part.with_name(part.name + ".unordered")):
            path.unlink(missing_ok=True)
