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
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from servegen.cluster.config import load_cluster_config
from servegen.cluster.managed import ManagedServer
from servegen.errors import ServegenError
from servegen.generation.config import GenerationConfig, ServerConfig, build_config
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
from servegen.inference.transport import FastTransport, TransportError, connects
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
# A co-located server is checked for life this often; its readiness probe is asked every
# hang_timeout / PROBES_PER_HANG_TIMEOUT s (at most every PROBE_EVERY_S), each answer awaited at most PROBE_TIMEOUT_S.
WATCH_INTERVAL_S = 0.5
PROBES_PER_HANG_TIMEOUT = 4
PROBE_EVERY_S = 10.0
PROBE_TIMEOUT_S = 5.0
class ServerDied(Exception):
    pass


def co_located_spec(server: ServerConfig, port: int):
    """The ServerSpec of the server a job starts for itself (cfg.server), listening on `port`."""
    from servegen.server.command import ServerSpec, split_args

    return ServerSpec(server_type=server.server_type, model=server.model, gpus=server.gpus, nodes=server.nodes,
                      port=port, args=split_args(server.args))


class CoLocatedServer(ManagedServer):
    """The model server this job starts on its own node(s) (cfg.server), each start on a free
    port, restarted (at most ++server.max_restarts times) when it dies or hangs (`watch`)."""

    def __init__(self, cfg: GenerationConfig, log_dir: Path):
        self.cfg = cfg.server
        super().__init__(
            co_located_spec(self.cfg, 1), load_cluster_config(cfg.cluster, cfg.config_dir),  # (port: each start's)
            lambda n: log_dir / f"{self.cfg.server_type}-server-{n}.log", self.cfg.ready_timeout,
            self.cfg.max_restarts, "++server.max_restarts", new_port=True,
        )

    def start(self) -> None:
        super().start()
        print(f"servegen: server ready at {self.address}", file=sys.stderr, flush=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def watch(self, answered_at: Callable[[], float], busy: Callable[[], bool], request_timeout: float) -> None:
        """Raise ServerDied when the server exits, or hangs (++server.hang_timeout = T): no sign of
        life for T s (its readiness probe answered 200, or a request finished: `answered_at()`,
        monotonic), or requests in flight (`busy()`) and none finished for max(T, request_timeout)
        s, as an engine stuck behind a live HTTP front end is (a long generation is no hang)."""
        hang = self.cfg.hang_timeout
        every = max(WATCH_INTERVAL_S, min(PROBE_EVERY_S, (hang or 0) / PROBES_PER_HANG_TIMEOUT))
        health = urllib.parse.urlsplit(self.process.health_url)
        transport = FastTransport(health.hostname, health.port, {})
        body = self.process.health_body.encode() if self.process.health_body is not None else None
        probed_ok = probed_at = time.monotonic()
        try:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                if not self.alive():
                    raise ServerDied(f"the server exited with code {self.process.proc.returncode}")
                if hang is None:
                    continue
                if time.monotonic() - probed_at >= every:
                    probed_at = time.monotonic()
                    try:
                        response = await transport.request(self.process.health_method, health.path, body,
                                                           min(PROBE_TIMEOUT_S, hang))
                        if response.status == 200:
                            probed_ok = time.monotonic()
                    except (TransportError, TimeoutError):
                        pass
                now = time.monotonic()
                if now - max(probed_ok, answered_at()) > hang:
                    raise ServerDied(f"the server hangs: it answered neither its readiness probe nor a request "
                                     f"for {hang:g} s (++server.hang_timeout)")
                stalled = max(hang, request_timeout)
                if busy() and now - answered_at() > stalled:
                    raise ServerDied(f"the server hangs: it finished none of the requests in flight for {stalled:g} s "
                                     "(++server.hang_timeout, or the request timeout if longer)")
        finally:
            await transport.close()


class Job:
    def __init__(self, cfg: GenerationConfig):
        if not cfg.input_file:
            raise ServegenError("++input_file is required")
        if not cfg.output_dir:
            raise ServegenError("++output_dir is required")
        self.cfg = cfg
        self.input = Path(cfg.input_file)
        if not self.input.is_file():
            raise ServegenError(f"input file {self.input} does not exist")
        self.out_dir = Path(cfg.output_dir)
        self.units = units_of(cfg)
        self.prompt = get_prompt(cfg.prompt_config, cfg.prompt_template, examples_type=cfg.examples_type)
        if cfg.server.address is None and not cfg.server.model:
            raise ServegenError("give ++server.model (a server started in this job) or ++server.address")
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
                "or fix --server_address"
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
                    "++prompts_per_request needs string prompts (a ++prompt_template); chat messages go one per request"
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
                    stats = runner.run(self._generate(unit, path, start, stop))
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

    async def _generate(self, unit: Unit, path: Path, start: int, stop: int) -> dict:
        cfg = self.cfg
        writer = OrderedWriter(path, first_index=start)
        already = writer.resume()
        if writer.next_index > stop:
            writer.close(complete=False)
            raise ServegenError(
                f"{path} has more rows than rows {start}..{stop - 1} of {self.input}: did the input change? "
                "(--rerun_done starts over)"
            )
        client = self._client(self.server.address if self.server is not None else cfg.server.address)
        window = WINDOW_PER_REQUEST * client.max_prompts_in_flight
        # position in the request stream -> (row index, line number, row, start time)
        in_flight: dict[int, tuple[int, int, dict, float]] = {}
        moved = asyncio.Event()
        bad_input: list[str] = []
        # what an input row loses before the new results are added: all of an earlier job's results
        replaced = frozenset(RESULT_FIELDS) | {cfg.generation_key}
        # the monotonic time a request last finished, or the first was sent after none were in flight
        answered_at = time.monotonic()

        async def prompts():
            # done rows are skipped unparsed; the first bad line stops the reading, and the rows
            # before it finish and are saved before the error is raised
            nonlocal answered_at
            rows = read_rows(self.input, start, stop, skip=writer.is_done)
            position = 0
            while True:
                try:
                    index, line_number, row = next(rows)
                except StopIteration:
                    return
                except ServegenError as e:  # the message names the file and line
                    bad_input.append(str(e))
                    return
                try:
                    prompt = self._build(row)
                except ServegenError as e:
                    bad_input.append(f"{self.input}:{line_number}: {e}")
                    return
                while index - writer.next_index >= window:
                    moved.clear()
                    await moved.wait()
                now = time.monotonic()
                if not in_flight:  # a quiet spell is not the server's silence
                    answered_at = now
                in_flight[position] = (index, line_number, row, now)
                position += 1
                yield prompt

        stats = RunStats()
        bar = tqdm(
            total=stop - start, initial=already, unit="row", file=sys.stderr, dynamic_ncols=True,
            desc=unit.file_name(), mininterval=1 if sys.stderr.isatty() else 30,
        )

        def server_died() -> bool:
            return self.server is not None and not self.server.alive()

        def stop_if_server_gone(error: str) -> None:
            # a failed request to a server that no longer takes connections is the server's
            # fault, not the row's: stop, keeping what is done, instead of writing failed rows
            if self.server is None and not connects(cfg.server.address):
                raise ServegenError(
                    f"the server at {cfg.server.address} stopped answering ({error}); the rows done are kept "
                    f"in {path}: run the job again to resume"
                )

        async def consume():
            try:
                async with contextlib.aclosing(client.generate_iter_async(prompts(), **self._params(unit))) as results:
                    async for position, result in results:
                        handle(position, result)
            except ModelUnknown as e:
                if self.server is not None:  # the job's own server: not something a flag fixes
                    raise
                raise ServegenError(
                    f"cannot find out which model the server at {cfg.server.address} serves ({e.cause}); "
                    "pass --model with the name it serves"
                ) from None
            except InferenceError as e:  # ++soft_fail=false
                if server_died():
                    raise ServerDied("the server died") from None
                stop_if_server_gone(str(e))
                if e.index not in in_flight:
                    raise
                line_number = in_flight[e.index][1]
                raise ServegenError(
                    f"{self.input}:{line_number}: {str(e).removeprefix(f'prompt {e.index}: ')} "
                    "(with ++soft_fail=true a failed request gives a row with an `error` field)"
                ) from None

        def handle(position: int, result: dict) -> None:
            nonlocal answered_at
            index, _, row, started = in_flight.pop(position)
            if "error" in result:
                if server_died():
                    raise ServerDied("the server died")  # its requests are redone after the restart
                stop_if_server_gone(result["error"])
            out = row if replaced.isdisjoint(row) else {k: v for k, v in row.items() if k not in replaced}
            out = {**out, **{k: v for k, v in result.items() if k != "generation"}}
            out[cfg.generation_key] = result["generation"]
            writer.add(index, out)
            moved.set()
            now = answered_at = time.monotonic()
            stats.add(now - started, result.get("num_generated_tokens") or 0, "error" in result)
            bar.update(1)
            bar.set_postfix_str(f"{stats.tokens / max(stats.elapsed(), 1e-9):.0f} tok/s", refresh=False)

        complete = False
        async with on_loop() as stopped:  # SIGTERM, SIGINT, SIGHUP: see servegen/cli.py
            signalled = asyncio.ensure_future(stopped.wait())
            tasks = [asyncio.ensure_future(consume())]
            if self.server is not None:
                tasks.append(asyncio.ensure_future(
                    self.server.watch(lambda: answered_at, lambda: bool(in_flight), client.timeout)))
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
                await client.aclose()
                bar.close()
                complete = not bad_input and writer.next_index == stop and not writer.waiting
                writer.close(complete=complete)
        if bad_input:
            raise ServegenError(bad_input[0] + " (rows before it are saved; fix the line and run again)")
        if not complete:  # never marked done: a run again resumes
            raise RuntimeError(f"the requests ended but {path} lacks rows from {writer.next_index}")
        return stats.as_dict()


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        cfg = build_config(sys.argv[1:] if argv is None else argv)
        return Job(cfg).run()

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
