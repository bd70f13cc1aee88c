"""How much CPU a client spends per request: completed requests/s and peak RSS when 20,000
requests go through each client to a local OpenAI-compatible stub that answers instantly.

    .venv/bin/python benchmarks/client_overhead.py

The stub is raw asyncio (uvloop when installed) with minimal parsing, in its own process pinned
to CPU 0; each client runs in a fresh process pinned to CPU 1, so that the peak RSS is that
client's alone. Clients, side by side:

- servegen: get_model("vllm", ...).generate(prompts), max_concurrent_requests=10000, one prompt
  per request like the others (prompts_per_request=1; vLLM's default of 16 would send 16 times
  fewer requests)
- openai.AsyncOpenAI with its default HTTP client class, 10000 in flight (a semaphore, the
  connection limits raised to match); and again with 100 in flight, where it is fastest
  (its connection pool slows down as it grows)
- requests + a pool of 256 threads (one Session per thread)
- aiohttp: a bare ClientSession loop, 10000 in flight (a reference, not a client)
- raw pipelined: 64 connections, 64 requests written at a time per connection; the stub's
  ceiling, to show the stub is not what limits the clients

Each async client runs on uvloop when it is installed. Every response is checked. A client
still running after --budget seconds (default 120) is stopped and measured on the requests it
completed. The clients run in 3 interleaved rounds and each one's best round is reported,
with the CPU time its process spent per request (user + system), which other work on the
machine does not inflate. Writes benchmarks/results/client_overhead.json and prints a table.
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "client_overhead.json"
CLIENTS = ("raw_pipelined", "servegen", "openai", "openai_100", "requests", "aiohttp")
LABELS = {
    "servegen": "servegen get_model('vllm').generate",
    "openai": "openai.AsyncOpenAI",
    "openai_100": "openai.AsyncOpenAI, 100 in flight",
    "requests": "requests + 256 threads",
    "aiohttp": "bare aiohttp loop (reference)",
    "raw_pipelined": "raw pipelined load (stub ceiling)",
}
REPLY = json.dumps(
    {
        "id": "cmpl-0",
        "object": "text_completion",
        "created": 0,
        "model": "stub",
        "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()


def _response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# ------------------------------------------------------------------------------------ the stub


class StubProtocol(asyncio.Protocol):
    """Answers every request on the connection in order; reads only what it needs to find the
    end of each request (the head, then Content-Length bytes), and for a request with several
    prompts (servegen's generation job on vllm: `return_token_ids`) how many, to answer one
    choice each with its token ids, as vLLM does."""

    completion = _response(REPLY)
    models = _response(MODELS)
    batches: dict[int, bytes] = {}

    @classmethod
    def batch(cls, body: bytes) -> bytes:
        n = len(json.loads(body)["prompt"])
        if n not in cls.batches:
            reply = json.loads(REPLY)
            reply["choices"] = [{**reply["choices"][0], "index": i, "token_ids": [0]} for i in range(n)]
            reply["usage"] = {"prompt_tokens": 3 * n, "completion_tokens": n, "total_tokens": 4 * n}
            cls.batches[n] = _response(json.dumps(reply).encode())
        return cls.batches[n]

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            lower = head.lower()
            i = lower.find(b"content-length:")
            length = 0
            if i >= 0:
                j = lower.find(b"\r\n", i)
                length = int(head[i + 15 : j if j >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                break
            if head.startswith(b"GET"):
                out.append(self.models)
            else:
                body = buf[end + 4 : end + 4 + length]
                out.append(self.batch(body) if b'"return_token_ids"' in body else self.completion)
            buf = buf[end + 4 + length :]
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


def serve(port: int) -> None:
    os.sched_setaffinity(0, {0})
    loop = _new_loop()

    async def main():
        server = await loop.create_server(StubProtocol, "127.0.0.1", port, backlog=16384, reuse_address=True)
        print("ready", flush=True)
        await server.serve_forever()

    loop.run_until_complete(main())


def _new_loop():
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# ----------------------------------------------------------------------------------- clients
# Each returns how many responses were right. Clients that cannot finish within the time budget
# (openai.AsyncOpenAI with 10,000 connections: its pool slows down as it grows) are stopped
# there and measured on what they completed.


def run_servegen(url: str, n: int, concurrency: int, budget: float) -> int:
    from servegen.inference import get_model

    llm = get_model("vllm", base_url=url, model="stub", max_concurrent_requests=concurrency, prompts_per_request=1,
                    max_retries=0)
    rows = llm.generate([f"prompt {i}" for i in range(n)], tokens_to_generate=16)
    llm.close()
    return sum(row["generation"] == "ok" for row in rows)


async def _gather_within(coros: list, budget: float) -> int:
    tasks = [asyncio.ensure_future(c) for c in coros]
    done, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return sum(task.result() for task in done)


def run_openai(url: str, n: int, concurrency: int, budget: float) -> int:
    import openai

    async def main():
        # the client's own default HTTP client class (httpx2-based in openai 3.x), limits raised
        library = sys.modules[openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]]
        limits = library.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=600)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", http_client=http, max_retries=0)
        slots = asyncio.Semaphore(concurrency)

        async def one(i):
            async with slots:
                r = await client.completions.create(model="stub", prompt=f"prompt {i}", max_tokens=16, temperature=0)
                return r.choices[0].text == "ok"

        ok = await _gather_within([one(i) for i in range(n)], budget)
        await client.close()
        return ok

    return _new_loop().run_until_complete(main())


def run_openai_100(url: str, n: int, concurrency: int, budget: float) -> int:
    return run_openai(url, n, 100, budget)


def run_requests(url: str, n: int, concurrency: int, budget: float) -> int:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    local = threading.local()
    deadline = time.perf_counter() + budget

    def one(i):
        if time.perf_counter() > deadline:
            return False
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        r = session.post(url + "/v1/completions", json={"model": "stub", "prompt": f"prompt {i}", "max_tokens": 16, "temperature": 0})
        return r.json()["choices"][0]["text"] == "ok"

    with ThreadPoolExecutor(256) as pool:
        return sum(pool.map(one, range(n)))


def run_aiohttp(url: str, n: int, concurrency: int, budget: float) -> int:
    import aiohttp

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            slots = asyncio.Semaphore(concurrency)

            async def one(i):
                async with slots:
                    body = {"model": "stub", "prompt": f"prompt {i}", "max_tokens": 16, "temperature": 0}
                    async with session.post(url + "/v1/completions", json=body) as r:
                        return (await r.json())["choices"][0]["text"] == "ok"

            return await _gather_within([one(i) for i in range(n)], budget)

    return _new_loop().run_until_complete(main())


def run_raw_pipelined(url: str, n: int, concurrency: int, budget: float) -> int:
    host, port = url.rsplit("/", 1)[-1].split(":")
    connections, depth = 64, 64
    body = json.dumps({"model": "stub", "prompt": "prompt", "max_tokens": 16, "temperature": 0}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    expected = _response(REPLY)

    async def connection(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        done = 0
        while done < count:
            k = min(depth, count - done)
            writer.write(request * k)
            data = await reader.readexactly(len(expected) * k)
            assert data == expected * k
            done += k
        writer.close()
        return done

    async def main():
        share = [n // connections + (i < n % connections) for i in range(connections)]
        return sum(await asyncio.gather(*(connection(c) for c in share)))

    return _new_loop().run_until_complete(main())


def client_main(name: str, url: str, n: int, concurrency: int, budget: float) -> None:
    """One client in this process: prints {"ok", "seconds", "cpu_seconds", "peak_rss_mb"} as JSON."""
    os.sched_setaffinity(0, {1})
    run = globals()[f"run_{name}"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    ok = run(url, n, concurrency, budget)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({"ok": ok, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": after.ru_maxrss / 1024}))


# -------------------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, n: int, concurrency: int, budget: float) -> dict:
    port = free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert stub.stdout.readline().strip() == "ready", "the stub did not start"
        argv = [sys.executable, __file__, "--client", name, "--url", f"http://127.0.0.1:{port}"]
        argv += ["--n", str(n), "--concurrency", str(concurrency), "--budget", str(budget)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=budget + 600)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stub.kill()
        stub.wait()
    stopped = result["ok"] < n and result["seconds"] >= budget
    if result["ok"] < n and not stopped:
        raise RuntimeError(f"{name}: only {result['ok']} of {n} responses were right")
    in_flight = min(n, 100 if name == "openai_100" else 256 if name == "requests" else 64 * 64 if name == "raw_pipelined" else concurrency)
    return {
        "client": name,
        "label": LABELS[name],
        "in_flight": in_flight,
        "requests": n,
        "completed": result["ok"],
        "stopped_at_budget": stopped,
        "seconds": result["seconds"],
        "req_per_s": result["ok"] / result["seconds"],
        "cpu_us_per_request": result["cpu_seconds"] / result["ok"] * 1e6 if result["ok"] else None,
        "peak_rss_mb": result["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="requests per client")
    parser.add_argument("--concurrency", type=int, default=10000, help="requests in flight where the client allows")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds a client may run before it is stopped and measured on what it completed")
    parser.add_argument("--rounds", type=int, default=3, help="runs per client, interleaved; the best is reported")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of " + ",".join(CLIENTS))
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.client:
        client_main(args.client, args.url, args.n, args.concurrency, args.budget)
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        print("error: this benchmark needs 2 CPUs (one for the stub, one for the client)", file=sys.stderr)
        return 2
    names = args.clients.split(",")
    for name in names:
        if name not in LABELS:
            print(f"error: unknown client {name!r}; choose from {','.join(CLIENTS)}", file=sys.stderr)
            return 2
    # rounds interleave the clients, so that a burst of other work on the machine does not land
    # on one client only; each client's best round is reported (a client stopped at the budget
    # runs once)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            if runs[name] and runs[name][0]["stopped_at_budget"]:
                continue
            r = measure(name, args.n, args.concurrency, args.budget)
            runs[name].append(r)
            note = f"  (stopped at {args.budget:.0f} s: {r['completed']:,} of {r['requests']:,} done)" if r["stopped_at_budget"] else ""
            cpu = f"{r['cpu_us_per_request']:>6,.0f} us CPU/req" if r["cpu_us_per_request"] else " " * 17
            print(f"round {round_ + 1}  {r['label']:<42} {r['req_per_s']:>9,.0f} req/s {cpu} {r['peak_rss_mb']:>6,.0f} MB{note}", flush=True)
    results = [max(runs[name], key=lambda r: r["req_per_s"]) for name in names]
    by = {r["client"]: r for r in results}
    ratios = {}
    if "servegen" in by:
        for other in ("openai", "openai_100", "requests", "aiohttp"):
            if other in by:  # None: the other completed nothing within the budget
                rate = by[other]["req_per_s"]
                ratios[f"servegen / {other}"] = by["servegen"]["req_per_s"] / rate if rate else None
    print("\n| client | in flight | completed | req/s (best round) | client CPU µs/request | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        done = f"{r['completed']:,}" + (f" in {args.budget:.0f} s (stopped)" if r["stopped_at_budget"] else "")
        cpu = f"{r['cpu_us_per_request']:,.0f}" if r["cpu_us_per_request"] else "-"
        print(f"| {r['label']} | {r['in_flight']:,} | {done} | {r['req_per_s']:,.0f} | {cpu} | {r['peak_rss_mb']:,.0f} |")
    for key, value in ratios.items():
        print(f"{key}: " + (f"{value:.1f}x" if value is not None else "- (the other completed nothing)"))
    meta = {
        "rounds": args.rounds,
        "requests": args.n,
        "concurrency": args.concurrency,
        "budget_s": args.budget,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average_at_end": os.getloadavg(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    every_run = [r for name in names for r in runs[name]]
    Path(args.output).write_text(json.dumps({"meta": meta, "best": results, "ratios": ratios, "runs": every_run}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
