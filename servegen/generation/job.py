"""The job body: `python -m servegen.generation.job ++input_file=... ++output_dir=... [++key=value ...]`.

It streams the input JSONL, builds a prompt per row, sends the prompts through a client to a
model server (started here, in this job, or an existing one), and writes the output rows in
input order (see files.py for how they survive kills and resume exactly once). The same command
runs on a laptop and inside a Slurm job; the pipeline (servegen generate) only decides where.
"""

from servegen.cli import exit_on_signals, on_loop, raise_if_stopped, run_main

if __name__ == "__main__":
    exit_on_signals()  # a signal while the imports below run ends us at once: nothing has started yet

import asyncio
import contextlib
import sys
import time
from pathlib import Path

from tqdm import tqdm

from servegen.errors import ServegenError
from servegen.generation.colocated import CoLocatedServer, ServerDied
from servegen.generation.config import GenerationConfig, build_config, setting_name
from servegen.generation.files import OrderedWriter, count_rows, done_marker, read_rows
from servegen.generation.outputs import (
    Unit,
    forget_outputs,
    merge_finished,
    merge_if_complete,
    output_done,
    output_locks,
    units_of,
)
from servegen.generation.summary import RunStats, write_summary
from servegen.inference import CLIENTS, RESULT_FIELDS, InferenceError, ModelUnknown, get_model
from servegen.inference.client import new_event_loop
from servegen.inference.transport import connects
from servegen.inference.params import Plan
from servegen.prompt import get_prompt

# Rows may finish out of order, and the ones waiting for an earlier row stay in memory: dispatch
# stops WINDOW_PER_REQUEST * (prompts in flight: max_concurrent_requests * prompts_per_request, or
# the client's budget) rows past the oldest unfinished one, which bounds memory whatever the
# dataset. That is more than the prompts in flight plus one batch, so no request slot idles, and
# the client gathers a batch under one lock, so only the newest rows can wait in a batch not yet
# sent: the window (>= prompts_per_request) never deadlocks (see Client.generate_iter_async).
WINDOW_PER_REQUEST = 4
# max_concurrent_requests=null with one prompt per request (chats, server types that do not batch):
# this many requests. With several prompts per request, the client's default: 1024 prompts in flight
# (short generations: see SHORT_GENERATION).
ONE_PROMPT_REQUESTS = 512
# Short generations (tokens_to_generate <= SHORT_GENERATION: answers, labels, verdicts) of string
# prompts on a server type that batches, with neither setting given: 64 prompts per request and 64
# requests in flight. A request lasts as long as its slowest prompt, short here, so big requests
# cost the engine nothing and save the server's per-request CPU (vLLM's API server: about 3 ms per
# request on the demo model); 64 requests, as with the client's default of 16 x 64, keep a few
# long prompts from holding most of the window; the 4096 prompts queued wait for at most
# 4096 x SHORT_GENERATION tokens (benchmarks/README.md, generate_vs_offline.py).
SHORT_GENERATION = 128
SHORT_PROMPTS_PER_REQUEST = SHORT_REQUESTS = 64
class Job:
    def __init__(self, cfg: GenerationConfig):
        if not cfg.input_file:
            raise ServegenError(f"{setting_name('input_file')} is required")
        if not cfg.output_dir:
            raise ServegenError(f"{setting_name('output_dir')} is required")
        self.cfg = cfg
        self.input = Path(cfg.input_file)
        if not self.input.is_file():
            raise ServegenError(f"input file {self.input} does not exist")
        self.out_dir = Path(cfg.output_dir)
        self.units = units_of(cfg)
        self.prompt = get_prompt(cfg.prompt_config, cfg.prompt_template, examples_type=cfg.examples_type)
        if cfg.server.address is None and not cfg.server.model:
            raise ServegenError(f"give {setting_name('server.model')} (a server started in this job) "
                                f"or {setting_name('server.address')}")
        # the other mistakes in the config fail here, before a server starts or a Slurm job queues
        self._client(cfg.server.address or "http://127.0.0.1")
        Plan(None, self._params(self.units[0]))
        self.server: CoLocatedServer | None = None

    def run(self) -> int:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # one writer per output, from before the first byte until the job ends (lock.py)
        with output_locks(self.out_dir, self.units):
            return self._run()

    def _run(self) -> int:
        cfg = self.cfg
        if cfg.rerun_done:
            forget_outputs(self.out_dir, self.units)
        merge_finished(self.out_dir, self.units)
        todo = [u for u in self.units if not output_done(self.out_dir, u)]
        if not todo:
            print(f"servegen: every output of this job is done in {self.out_dir}", file=sys.stderr)
            return 0
        total = count_rows(self.input)
        if cfg.max_samples >= 0:
            total = min(total, cfg.max_samples)
        if cfg.server.address is None:
            self.server = CoLocatedServer(cfg, Path(cfg.log_dir or self.out_dir / "logs"))
        elif not connects(cfg.server.address):  # else every row would be written as failed
            raise ServegenError(
                f"nothing answers at {cfg.server.address}: start the server first (servegen start_server) "
                f"or fix {setting_name('server.address')}"
            )
        try:
            if self.server is not None:
                self.server.start()
            for unit in todo:
                self._run_unit(unit, total)
        finally:
            if self.server is not None:
                self.server.stop()
        return 0

    def _client(self, address: str):
        cfg = self.cfg
        model = cfg.server.model
        if cfg.server.address is None and cfg.server.server_type != "hf":
            model = None  # the job's own server says the name it serves in /v1/models (hf: the model's path)
        inf = cfg.inference
        kwargs = {"timeout": inf.timeout} if inf.timeout else {}
        per_request, concurrency = cfg.prompts_per_request, cfg.max_concurrent_requests
        if cfg.prompt_template is None:  # chat messages go one per request
            if per_request is not None and per_request > 1:
                raise ServegenError(
                    f"{setting_name('prompts_per_request')} needs string prompts (a {setting_name('prompt_template')}); "
                    "chat messages go one per request"
                )
            per_request = 1 if per_request is None else per_request
        cls = CLIENTS.get(cfg.server.server_type)  # an unknown one: get_model says so
        if concurrency is None and cls is not None and (per_request or cls.default_prompts_per_request) == 1:
            concurrency = ONE_PROMPT_REQUESTS
        elif (concurrency is None and per_request is None and cls is not None
              and cls.default_prompts_per_request > 1 and inf.tokens_to_generate <= SHORT_GENERATION):
            per_request, concurrency = SHORT_PROMPTS_PER_REQUEST, SHORT_REQUESTS
        return get_model(
            cfg.server.server_type, base_url=address, model=model, max_concurrent_requests=concurrency,
            prompts_per_request=per_request, soft_fail=cfg.soft_fail,
            max_retries=inf.max_retries, retry_backoff=inf.retry_backoff, max_backoff=inf.max_backoff, **kwargs,
        )

    def _run_unit(self, unit: Unit, total: int) -> None:
        path = self.out_dir / unit.file_name()
        start, stop = unit.rows(total)
        while True:
            try:
                with asyncio.Runner(loop_factory=new_event_loop) as runner:  # uvloop: less CPU per row
                    stats = runner.run(UnitRun(self, unit, path, start, stop).run())
                break
            except ServerDied as e:
                self.server.restart(str(e))
        raise_if_stopped()  # a signal that came as the event loop started or ended: no .done
        # the summary first: whoever sees the .done (a merging chunk, the user) finds it
        write_summary(path, stats)
        done_marker(path).write_text("")
        if unit.chunk is not None:
            merge_if_complete(self.out_dir, unit)

    def _params(self, unit: Unit) -> dict:
        inf = self.cfg.inference
        seed = unit.seed if unit.seed is not None else inf.random_seed
        params = dict(
            tokens_to_generate=inf.tokens_to_generate, temperature=inf.temperature, top_p=inf.top_p,
            top_k=inf.top_k, min_p=inf.min_p, repetition_penalty=inf.repetition_penalty, random_seed=seed,
        )
        if self.cfg.prompt_template is not None:
            params["stop_phrases"] = list(self.prompt.stop_phrases) + list(self.cfg.stop_phrases)
        elif self.cfg.stop_phrases:
            params["stop_phrases"] = list(self.cfg.stop_phrases)
        if self.cfg.output_type:
            params["output_type"] = dict(self.cfg.output_type)
        return params

    def _build(self, row: dict):
        if self.cfg.prompt_template is not None:
            return self.prompt.build_string(row)
        return self.prompt.build_messages(row, drop_empty_system=True)


class UnitRun:
    """One pass over the rows [start, stop) of one output against one server: the rows not yet
    done are read, prompted, sent, and written back in input order (files.OrderedWriter), until
    every row is written (the output complete) or something stops the pass, the rows done kept.
    Its steps share the rows in flight, the writer, and when the server last answered."""

    def __init__(self, job: Job, unit: Unit, path: Path, start: int, stop: int):
        self.job, self.cfg, self.server = job, job.cfg, job.server
        self.unit, self.path, self.start, self.stop = unit, path, start, stop
        # position in the request stream -> (row index, line number, row, start time)
        self.in_flight: dict[int, tuple[int, int, dict, float]] = {}
        self.bad_input: list[str] = []  # the first bad input line's error: it ends the reading
        # what an input row loses before the new results are added: all of an earlier job's results
        self.replaced = frozenset(RESULT_FIELDS) | {self.cfg.generation_key}
        self.stats = RunStats()

    async def run(self) -> dict:
        """The pass: its summary's numbers when every row is written, else an error."""
        self._resume()
        async with on_loop() as stopped:  # SIGTERM, SIGINT, SIGHUP: see servegen/cli.py
            signalled = asyncio.ensure_future(stopped.wait())
            tasks = [asyncio.ensure_future(self._consume())]
            if self.server is not None:
                tasks.append(asyncio.ensure_future(self.server.watch(
                    lambda: self.answered_at, lambda: bool(self.in_flight), self.client.timeout)))
            try:
                done, _ = await asyncio.wait([signalled, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if signalled in done:
                    raise_if_stopped()  # raises Interrupted
                for task in done:
                    task.result()  # raises ServerDied or a client error
            finally:
                for task in (signalled, *tasks):
                    task.cancel()
                await asyncio.gather(signalled, *tasks, return_exceptions=True)
                complete = await self._close()
        if self.bad_input:
            raise ServegenError(self.bad_input[0] + " (rows before it are saved; fix the line and run again)")
        if not complete:  # never marked done: a run again resumes
            raise RuntimeError(f"the requests ended but {self.path} lacks rows from {self.writer.next_index}")
        return self.stats.as_dict()

    def _resume(self) -> None:
        """Open the output where an earlier pass left it; the client, the window, the progress bar."""
        self.writer = OrderedWriter(self.path, first_index=self.start)
        already = self.writer.resume()
        if self.writer.next_index > self.stop:
            self.writer.close(complete=False)
            raise ServegenError(
                f"{self.path} has more rows than rows {self.start}..{self.stop - 1} of {self.job.input}: did the "
                f"input change? ({setting_name('rerun_done')} starts over)"
            )
        self.client = self.job._client(self.server.address if self.server is not None else self.cfg.server.address)
        self.window = WINDOW_PER_REQUEST * self.client.max_prompts_in_flight
        self.moved = asyncio.Event()  # a row was written: the window may move on
        # the monotonic time a request last finished, or the first was sent after none were in flight
        self.answered_at = time.monotonic()
        self.bar = tqdm(
            total=self.stop - self.start, initial=already, unit="row", file=sys.stderr, dynamic_ncols=True,
            desc=self.unit.file_name(), mininterval=1 if sys.stderr.isatty() else 30,
        )

    async def _close(self) -> bool:
        """Close the client, the bar and the output (marked complete if every row is in it)."""
        await self.client.aclose()
        self.bar.close()
        complete = not self.bad_input and self.writer.next_index == self.stop and not self.writer.waiting
        self.writer.close(complete=complete)
        return complete

    async def _prompts(self):
        # done rows are skipped unparsed; the first bad line stops the reading, and the rows
        # before it finish and are saved before the error is raised
        rows = read_rows(self.job.input, self.start, self.stop, skip=self.writer.is_done)
        position = 0
        while True:
            try:
                index, line_number, row = next(rows)
            except StopIteration:
                return
            except ServegenError as e:  # the message names the file and line
                self.bad_input.append(str(e))
                return
            try:
                prompt = self.job._build(row)
            except ServegenError as e:
                self.bad_input.append(f"{self.job.input}:{line_number}: {e}")
                return
            while index - self.writer.next_index >= self.window:
                self.moved.clear()
                await self.moved.wait()
            now = time.monotonic()
            if not self.in_flight:  # a quiet spell is not the server's silence
                self.answered_at = now
            self.in_flight[position] = (index, line_number, row, now)
            position += 1
            yield prompt

    async def _consume(self) -> None:
        cfg = self.cfg
        try:
            params = self.job._params(self.unit)
            async with contextlib.aclosing(self.client.generate_iter_async(self._prompts(), **params)) as results:
                async for position, result in results:
                    self._write(position, result)
        except ModelUnknown as e:
            if self.server is not None:  # the job's own server: not something a flag fixes
                raise
            raise ServegenError(
                f"cannot find out which model the server at {cfg.server.address} serves ({e.cause}); "
                f"pass {setting_name('server.model')} with the name it serves"
            ) from None
        except InferenceError as e:  # ++soft_fail=false
            if self._server_died():
                raise ServerDied("the server died") from None
            self._stop_if_server_gone(str(e))
            if e.index not in self.in_flight:
                raise
            line_number = self.in_flight[e.index][1]
            raise ServegenError(
                f"{self.job.input}:{line_number}: {str(e).removeprefix(f'prompt {e.index}: ')} "
                f"(with {setting_name('soft_fail')}=true a failed request gives a row with an `error` field)"
            ) from None

    def _write(self, position: int, result: dict) -> None:
        index, _, row, started = self.in_flight.pop(position)
        if "error" in result:
            if self._server_died():
                raise ServerDied("the server died")  # its requests are redone after the restart
            self._stop_if_server_gone(result["error"])
        out = row if self.replaced.isdisjoint(row) else {k: v for k, v in row.items() if k not in self.replaced}
        out = {**out, **{k: v for k, v in result.items() if k != "generation"}}
        out[self.cfg.generation_key] = result["generation"]
        self.writer.add(index, out)
        self.moved.set()
        now = self.answered_at = time.monotonic()
        self.stats.add(now - started, result.get("num_generated_tokens") or 0, "error" in result)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.stats.tokens / max(self.stats.elapsed(), 1e-9):.0f} tok/s", refresh=False)

    def _server_died(self) -> bool:
        return self.server is not None and not self.server.alive()

    def _stop_if_server_gone(self, error: str) -> None:
        # a failed request to a server that no longer takes connections is the server's fault,
        # not the row's: stop, keeping what is done, instead of writing failed rows
        address = self.cfg.server.address
        if self.server is None and not connects(address):
            raise ServegenError(
                f"the server at {address} stopped answering ({error}); the rows done are kept "
                f"in {self.path}: run the job again to resume"
            )


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        cfg = build_config(sys.argv[1:] if argv is None else argv)
        return Job(cfg).run()

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
