"""A job's summary file beside each output: the rows, failures and tokens in the file, and this
run's throughput and latency percentiles, kept as a histogram so that chunks' summaries merge."""

import bisect
import json
import math
import time
from pathlib import Path

# Latency histogram buckets (seconds, log-spaced from 1 ms to ~3 h): percentiles that chunks can merge.
BUCKETS = [10 ** (-3 + i / 25) for i in range(176)]


def summary_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")


class RunStats:
    def __init__(self):
        self.started = time.monotonic()
        self.started_at = time.time()
        self.rows = 0
        self.failed = 0
        self.tokens = 0
        self.histogram = [0] * (len(BUCKETS) + 1)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, latency: float, tokens: int, failed: bool) -> None:
        self.rows += 1
        self.failed += failed
        self.tokens += tokens
        self.histogram[bisect.bisect_left(BUCKETS, latency)] += 1

    def as_dict(self) -> dict:
        wall = self.elapsed()
        return {
            "rows_in_run": self.rows,
            "failed_rows_in_run": self.failed,
            "generated_tokens_in_run": self.tokens,
            "wall_time_s": round(wall, 3),
            "started_at": round(self.started_at, 3),  # unix time: merged chunks' wall time spans them
            "finished_at": round(self.started_at + wall, 3),
            "rows_per_s": round(self.rows / wall, 2) if wall else None,
            "tokens_per_s": round(self.tokens / wall, 2) if wall else None,
            "latency_histogram": self.histogram,
        }


def percentile(histogram: list[int], q: float) -> float | None:
    """The upper edge of the bucket holding the q-th quantile (within 10% of the true value)."""
    n = sum(histogram)
    if not n:
        return None
    rank = math.ceil(q * n)
    seen = 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return round(BUCKETS[min(i, len(BUCKETS) - 1)], 4)
    return None


def file_totals(path: Path) -> dict:
    rows = failed = tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows += 1
            failed += "error" in row
            tokens += row.get("num_generated_tokens") or 0
    return {"rows": rows, "failed_rows": failed, "generated_tokens": tokens}


def write_summary(path: Path, run: dict) -> None:
    summary = {"output": path.name, **file_totals(path), **_with_percentiles(run)}
    summary_path(path).write_text(json.dumps(summary, indent=2) + "\n")


def merge_summaries(target: Path, parts: list[Path]) -> None:
    loaded = [json.loads(p.read_text()) for p in parts if p.exists()]
    merged = {"output": target.name.replace(".summary.json", ".jsonl"), "chunks": len(parts)}
    for key in ("rows", "failed_rows", "generated_tokens", "rows_in_run", "failed_rows_in_run",
                "generated_tokens_in_run"):
        merged[key] = sum(s.get(key, 0) for s in loaded)
    # chunks run side by side (a Slurm array) or one after the other: the wall time spans them all
    started = min((s["started_at"] for s in loaded), default=0.0)
    finished = max((s["finished_at"] for s in loaded), default=0.0)
    wall = finished - started
    merged["wall_time_s"] = round(wall, 3)
    merged["started_at"], merged["finished_at"] = started, finished
    merged["rows_per_s"] = round(merged["rows_in_run"] / wall, 2) if wall > 0 else None
    merged["tokens_per_s"] = round(merged["generated_tokens_in_run"] / wall, 2) if wall > 0 else None
    histogram = [0] * (len(BUCKETS) + 1)
    for s in loaded:
        for i, count in s["latency_histogram"].items():
            histogram[int(i)] += count
    merged["latency_histogram"] = histogram
    target.write_text(json.dumps(_with_percentiles(merged), indent=2) + "\n")


def _with_percentiles(summary: dict) -> dict:
    """Latency percentiles, and the histogram they come from (bucket i ends at 10**(-3 + i/25) s;
    only non-empty buckets are listed) so that chunks' summaries can be merged."""
    histogram = summary["latency_histogram"]
    latency = {f"p{int(q * 100)}": percentile(histogram, q) for q in (0.5, 0.9, 0.99)}
    sparse = {str(i): c for i, c in enumerate(histogram) if c}
    return {**{k: v for k, v in summary.items() if k != "latency_histogram"}, "latency_s": latency,
            "latency_histogram": sparse}
