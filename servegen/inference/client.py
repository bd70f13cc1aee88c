"""The machinery every server type shares: concurrency, retries, timeouts, typed-output retries,
stop phrases, streaming, the sync and async APIs. A server type (openai_compat.py, nemo.py)
only says what a request body looks like and how to read the answer.

Concurrency: a call with N prompts runs min(N, max_concurrent_requests) workers that take the
next prompt index as they finish one, so memory holds the prompts, the results and one request
per worker, never N pending requests. A semaphore per event loop bounds the requests in flight
across concurrent calls on one client.

Retries (max_retries, exponential backoff with jitter, retry_backoff * 2**attempt seconds times
a random factor in [0.5, 1], at most max_backoff): connection errors, timeouts, 429 (waiting at
least its Retry-After, at most max_backoff), 5xx, and 200 answers whose body is not the JSON we
expect (a truncated or corrupted body is as transient as a dropped connection; a server that
always sends one ends in RetriesExhausted after the same bounded number of attempts). Any other
4xx is the request's fault: no retry, RequestRejected with the server's message
(ContextLengthError when the prompt does not fit). Every attempt has a timeout, so every request
ends within (max_retries + 1) * (timeout + max_backoff).
"""

import asyncio
import dataclasses
import email.utils
import json
import random
import re
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from servegen.errors import ServegenError
from servegen.inference import stops
from servegen.inference.errors import (
    ContextLengthError,
    InferenceError,
    InvalidOutput,
    RequestRejected,
    RetriesExhausted,
    redact,
)
from servegen.inference.http import TransportError, make_transport
from servegen.inference.params import Params, Plan

_CONTEXT_LENGTH = re.compile(
    r"context length|context window|maximum model length|max_model_len|max_seq_len|too long|"
    r"exceeds? the max|longer than the max|context_length_exceeded",
    re.IGNORECASE,
)


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once: cheaper per call


class _Secret:
    """A value that shows as *** in reprs, vars() and debuggers."""

    __slots__ = ("value",)

    def __init__(self, value: str | None):
        self.value = value

    def __repr__(self) -> str:
        return "'***'" if self.value else "None"


class _LoopState:
    """What a client keeps per event loop: its connections and its bound on requests in flight."""

    def __init__(self, transport, max_concurrent_requests: int):
        self.transport = transport
        self.slots = asyncio.Semaphore(max_concurrent_requests)


class Client:
    """A model server of one type. Use `get_model(...)` to make one."""

    server_type = "openai"
    discovers_model = True  # model=None: ask GET /v1/models

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        max_concurrent_requests: int = 1024,
        max_retries: int = 5,
        timeout: float = 1800.0,
        retry_backoff: float = 0.5,
        max_backoff: float = 60.0,
        max_output_retries: int = 2,
        soft_fail: bool = False,
        transport: str | None = None,
    ):
        if not isinstance(max_concurrent_requests, int) or max_concurrent_requests < 1:
            raise ServegenError(f"max_concurrent_requests must be an integer >= 1, got {max_concurrent_requests!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ServegenError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not isinstance(max_output_retries, int) or max_output_retries < 0:
            raise ServegenError(f"max_output_retries must be an integer >= 0, got {max_output_retries!r}")
        if not timeout or timeout <= 0:
            raise ServegenError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if transport not in (None, "fast", "aiohttp"):
            raise ServegenError(f'transport must be None (pick), "fast" or "aiohttp", got {transport!r}')
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServegenError(f"base_url must look like http://host:port or https://host/v1, got {base_url!r}")
        if transport == "fast" and parts.scheme == "https":
            raise ServegenError('transport="fast" speaks plain http only; use the default (aiohttp for https)')
        # the paths we send start with /v1; a base_url may or may not end with it
        root = base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        self.base_url = root
        self._prefix = urllib.parse.urlsplit(root).path
        self.model = model
        self._api_key = _Secret(api_key or None)
        self.max_concurrent_requests = max_concurrent_requests
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.max_output_retries = max_output_retries
        self.soft_fail = soft_fail
        self._transport_kind = transport
        self._states: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]" = weakref.WeakKeyDictionary()
        self._sync_lock = threading.Lock()
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._sync_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, api_key={self._api_key!r})"

    # ------------------------------------------------------------------ what a server type says

    def build_request(self, prompt: Any, p: Params, stream: bool = False) -> tuple[str, str, dict]:
        """(method, path, body) of one request."""
        raise NotImplementedError

    def parse_response(self, data: Any, prompt: Any, p: Params) -> dict:
        """A result row {generation, num_generated_tokens, finish_reason, ...} from a 200 body."""
        raise NotImplementedError

    def parse_stream_event(self, event: dict) -> str:
        """The text in one server-sent event of a stream."""
        raise NotImplementedError

    def check_prompt(self, prompt: Any, p: Params) -> None:
        """ServegenError for what this server type cannot do with this prompt and parameters."""

    # ------------------------------------------------------------------ plumbing

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            headers = {"User-Agent": "servegen", "Accept": "application/json"}
            if self._api_key.value:
                headers["Authorization"] = f"Bearer {self._api_key.value}"
            transport = make_transport(self.base_url, headers, self.max_concurrent_requests, self._transport_kind)
            state = self._states[loop] = _LoopState(transport, self.max_concurrent_requests)
        return state

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key.value)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff, self.retry_backoff * 2**attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)

    def _rejected(self, status: int, body: bytes, path: str) -> RequestRejected:
        message = self._redact(_server_message(body))
        cls = ContextLengthError if _CONTEXT_LENGTH.search(message) else RequestRejected
        hint = ""
        if status in (401, 403):
            hint = " (check api_key / the server's --api-key)"
        elif status == 404 and self.model is not None:
            hint = f" (is {self.base_url} a {self.server_type} server serving model {self.model!r}?)"
        return cls(f"{self.server_type} server rejected the request: HTTP {status} on {path}: {message}{hint}", status)

    async def _call(self, state: _LoopState, method: str, path: str, payload: bytes | None, timeout: float, parse):
        """One request with retries; `parse(json_value)` makes the result from a 2xx body, and a
        body it cannot read (KeyError, TypeError, IndexError, ValueError) is a failed attempt."""
        attempt = 0
        while True:
            retry_after = None
            try:
                response = await state.transport.request(method, path, payload, timeout)
            except TimeoutError as e:
                problem = f"timed out: {e}"
            except TransportError as e:
                problem = str(e)
            else:
                status = response.status
                if 200 <= status < 300:
                    try:
                        return parse(json.loads(response.body))
                    except InferenceError:
                        raise
                    except (ValueError, KeyError, TypeError, IndexError) as e:
                        problem = f"unreadable 200 response ({type(e).__name__}: {e}): {_snippet(response.body)}"
                elif status == 429 or status >= 500:
                    problem = f"HTTP {status}: {_server_message(response.body)}"
                    retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    raise self._rejected(status, response.body, path)
            if attempt >= self.max_retries:
                raise RetriesExhausted(
                    self._redact(f"{method} {self.base_url}{path} failed {attempt + 1} times; last: {problem}")
                )
            await asyncio.sleep(self._backoff(attempt, retry_after))
            attempt += 1

    async def _ensure_model(self, state: _LoopState) -> None:
        if self.model is not None or not self.discovers_model:
            return

        def first_model(data):
            return data["data"][0]["id"]

        try:
            self.model = await self._call(state, "GET", self._prefix + "/v1/models", None, min(self.timeout, 60.0), first_model)
        except InferenceError as e:
            raise InferenceError(f"cannot find out which model the server serves ({e}); pass model= to get_model") from None

    async def _generate_one(self, state: _LoopState, prompt: Any, p: Params) -> dict:
        """One prompt, retried as a whole when its typed output does not validate."""
        self.check_prompt(prompt, p)
        timeout = p.timeout or self.timeout
        failure = None
        seed = p.random_seed
        for attempt in range(1 + (self.max_output_retries if p.spec is not None else 0)):
            if attempt and seed is not None:
                p = dataclasses.replace(p, random_seed=seed + attempt)  # the same seed, the same answer
            method, path, body = self.build_request(prompt, p)
            payload = _encode(body).encode()
            row = await self._call(state, method, self._prefix + path, payload, timeout, lambda d: self.parse_response(d, prompt, p))
            if p.stop_phrases:
                text, found = stops.trim(row["generation"], p.stop_phrases, not p.remove_stop_phrases)
                if found:
                    row["generation"] = text
                    row["finish_reason"] = "stop"
            if p.spec is None:
                return row
            try:
                row["output"] = p.spec.parse(row["generation"])
                return row
            except ValueError as e:
                failure = (str(e), row["generation"])
        raise InvalidOutput(f"the generation is not a valid typed output after {attempt + 1} attempts: {failure[0]}", failure[1])

    async def _row(self, state: _LoopState, prompt: Any, p: Params, index: int, soft_fail: bool) -> dict:
        async with state.slots:
            try:
                return await self._generate_one(state, prompt, p)
            except InferenceError as e:
                e.index = index
                e.args = (f"prompt {index}: {e}",)
                if not soft_fail:
                    raise
                generation = e.generation if isinstance(e, InvalidOutput) else None
                row = {"generation": generation, "num_generated_tokens": 0, "finish_reason": "error", "error": str(e)}
                if p.spec is not None:
                    row["output"] = None
                return row

    # ------------------------------------------------------------------ async API

    async def generate_async(self, prompts: list, soft_fail: bool | None = None, **params) -> list[dict]:
        """Like `generate`, on the caller's event loop."""
        prompts = _check_prompts(prompts)
        plan = Plan(len(prompts), params)
        soft = self.soft_fail if soft_fail is None else soft_fail
        state = self._state()
        await self._ensure_model(state)
        n = len(prompts)
        results: list = [None] * n
        cursor = 0

        async def worker():
            nonlocal cursor
            while cursor < n:
                i = cursor
                cursor += 1
                results[i] = await self._row(state, prompts[i], plan.params(i), i, soft)

        await _run_workers([worker() for _ in range(min(n, self.max_concurrent_requests))])
        return results

    async def generate_one_async(self, prompt: Any, soft_fail: bool | None = None, **params) -> dict:
        """One prompt (scalar parameters only), for callers that schedule requests themselves."""
        plan = Plan(None, params)
        state = self._state()
        await self._ensure_model(state)
        return await self._row(state, prompt, plan.shared, 0, self.soft_fail if soft_fail is None else soft_fail)

    async def generate_iter_async(
        self, prompts: Iterable | AsyncIterable, soft_fail: bool | None = None, **params
    ) -> AsyncIterator[tuple[int, dict]]:
        """(index, result) pairs as requests complete, reading `prompts` lazily: at most
        max_concurrent_requests prompts are taken but unfinished, and a consumer that stops
        reading stops the reading of prompts too. Items are prompts or dicts
        {"prompt": ..., <parameter>: <value>, ...} with per-row parameters. Parameters given here
        are scalars for every row."""
        job = _IterJob(self, prompts, Plan(None, params), self.soft_fail if soft_fail is None else soft_fail)
        await job.start()
        try:
            while True:
                item = await job.results.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await job.cancel()

    async def stream_async(self, prompt: Any, **params) -> AsyncIterator[str]:
        """The generation of one prompt as text pieces while the server produces them. Stop phrases
        are trimmed as the text arrives. The timeout is the longest silence allowed. Retries
        happen only before the first piece."""
        p = Plan(None, params).shared
        if p.spec is not None:
            raise ServegenError("typed outputs cannot be streamed; use generate(..., output_type=...)")
        state = self._state()
        await self._ensure_model(state)
        self.check_prompt(prompt, p)
        async with state.slots:
            async for piece in self._stream_pieces(state, prompt, p):
                yield piece

    async def _stream_pieces(self, state: _LoopState, prompt: Any, p: Params) -> AsyncIterator[str]:
        method, path, body = self.build_request(prompt, p, stream=True)
        path = self._prefix + path
        payload = _encode(body).encode()
        timeout = p.timeout or self.timeout
        trimmer = stops.StreamTrimmer(p.stop_phrases, not p.remove_stop_phrases)
        attempt = 0
        while True:
            retry_after = None
            response = state.transport.stream(method, path, payload, timeout)
            try:
                await response.__aenter__()
            except (TimeoutError, TransportError) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                try:
                    if 200 <= response.status < 300:
                        async for text in self._sse_texts(response):
                            shown = trimmer.feed(text)
                            if shown:
                                yield shown
                            if trimmer.stopped:
                                return
                        rest = trimmer.flush()
                        if rest:
                            yield rest
                        return
                    body = await response.read()
                    if response.status != 429 and response.status < 500:
                        raise self._rejected(response.status, body, path)
                    problem = f"HTTP {response.status}: {_server_message(body)}"
                    retry_after = _retry_after(response.headers.get("retry-after"))
                except (TimeoutError, TransportError) as e:
                    raise InferenceError(self._redact(f"the stream from {self.base_url}{path} broke: {e}")) from None
                finally:
                    await response.__aexit__(None, None, None)
            if attempt >= self.max_retries:
                raise RetriesExhausted(self._redact(f"POST {self.base_url}{path} failed {attempt + 1} times; last: {problem}"))
            await asyncio.sleep(self._backoff(attempt, retry_after))
            attempt += 1

    async def _sse_texts(self, response) -> AsyncIterator[str]:
        """The texts of a server-sent event stream, up to `data: [DONE]` or the end of the body."""
        pending = b""
        async for piece in response:
            lines = (pending + piece).split(b"\n")
            pending = lines.pop()
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: / id: fields
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and event.get("error"):
                    raise InferenceError(self._redact(f"the server reported an error mid-stream: {_error_text(event)}"))
                text = self.parse_stream_event(event)
                if text:
                    yield text

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.transport.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ sync API

    def generate(
        self,
        prompts: list,
        tokens_to_generate: int | list = 512,
        temperature: float | list = 0.0,
        top_p: float | list = 1.0,
        top_k: int | list = -1,
        min_p: float | list = 0.0,
        repetition_penalty: float | list = 1.0,
        random_seed: int | None | list = None,
        stop_phrases: str | list | None = None,
        remove_stop_phrases: bool | list = True,
        timeout: float | None | list = None,
        top_logprobs: int | None | list = None,
        output_type: dict | list | None = None,
        json_schema: Any = None,
        soft_fail: bool | None = None,
        extra_body: dict | list | None = None,
    ) -> list[dict]:
        """One result per prompt, in input order.

        prompts: strings (sent as is to /v1/completions, special tokens included) or chat
        conversations (lists of {"role", "content"} dicts, sent to /v1/chat/completions).
        Every parameter is a scalar for all prompts or a list with one value per prompt.
        top_k -1 or 0: off. stop_phrases: the generation ends before the first one (after it
        with remove_stop_phrases=False). timeout: seconds per attempt (default: the client's).
        top_logprobs: k adds `tokens`, `logprobs` (and `top_logprobs` when k > 0) to each row.
        output_type / json_schema: typed output, parsed and validated into row["output"].
        soft_fail: a prompt that fails gives a row with an `error` field instead of raising.
        extra_body: extra fields merged into each request body (engine-specific options).

        Row: generation, num_generated_tokens, finish_reason (+ output, tokens, logprobs,
        top_logprobs, error).
        """
        return self._run(
            self.generate_async(
                prompts,
                soft_fail=soft_fail,
                tokens_to_generate=tokens_to_generate,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                random_seed=random_seed,
                stop_phrases=stop_phrases,
                remove_stop_phrases=remove_stop_phrases,
                timeout=timeout,
                top_logprobs=top_logprobs,
                output_type=output_type,
                json_schema=json_schema,
                extra_body=extra_body,
            )
        )

    def generate_iter(self, prompts: Iterable, soft_fail: bool | None = None, **params) -> Iterator[tuple[int, dict]]:
        """`generate_iter_async` for synchronous code: (index, result) pairs as they complete."""
        loop = self._loop()
        job = _IterJob(self, prompts, Plan(None, params), self.soft_fail if soft_fail is None else soft_fail)
        self._run(job.start())
        try:
            while True:
                for item in self._run(job.take_ready()):
                    if item is _DONE:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            if not loop.is_closed():
                self._run(job.cancel())

    def stream(self, prompt: Any, **params) -> Iterator[str]:
        """`stream_async` for synchronous code."""
        pieces = self.stream_async(prompt, **params)
        try:
            while True:
                try:
                    yield self._run(pieces.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(pieces.aclose())

    def close(self) -> None:
        """Close every connection and stop the thread that runs the sync API."""
        with self._sync_lock:
            loop, thread = self._sync_loop, self._sync_thread
            self._sync_loop = self._sync_thread = None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The event loop of the sync API: its own thread, started on first use (uvloop if installed)."""
        with self._sync_lock:
            if self._sync_loop is None:
                loop = _new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="servegen-client", daemon=True)
                thread.start()
                self._sync_loop, self._sync_thread = loop, thread
            return self._sync_loop

    def _run(self, coro):
        loop = self._loop()
        if threading.current_thread() is self._sync_thread:
            coro.close()
            raise RuntimeError("the sync API cannot be called from its own event loop; use the *_async methods")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise


_DONE = object()


class _IterJob:
    """The workers of generate_iter(_async) and the bounded queue of their results."""

    def __init__(self, client: Client, prompts: Iterable | AsyncIterable, plan: Plan, soft_fail: bool):
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, (Iterable, AsyncIterable)):
            raise ServegenError("prompts must be an iterable of prompts (or of {'prompt': ...} dicts)")
        self.client = client
        self.plan = plan
        self.soft_fail = soft_fail
        self.source = prompts
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        client = self.client
        state = client._state()
        await client._ensure_model(state)
        workers = client.max_concurrent_requests
        self.results: asyncio.Queue = asyncio.Queue(maxsize=workers)
        is_async = isinstance(self.source, AsyncIterable)
        source = aiter(self.source) if is_async else iter(self.source)
        lock = asyncio.Lock()
        counter = 0
        exhausted = False

        async def next_item():
            nonlocal counter, exhausted
            if exhausted:
                return None
            if is_async:
                async with lock:  # an async generator takes one __anext__ at a time
                    try:
                        item = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        return None
            else:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    return None
            counter += 1
            return counter - 1, item

        async def worker():
            while (taken := await next_item()) is not None:
                index, item = taken
                prompt, p = self.plan.for_item(item)
                row = await client._row(state, prompt, p, index, self.soft_fail)
                await self.results.put((index, row))

        async def run():
            try:
                await _run_workers([worker() for _ in range(workers)])
                await self.results.put(_DONE)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                await self.results.put(e)

        self.tasks = [asyncio.get_running_loop().create_task(run())]

    async def take_ready(self) -> list:
        """At least one result, and every other one already waiting (fewer thread hops)."""
        items = [await self.results.get()]
        while items[-1] is not _DONE and not isinstance(items[-1], BaseException) and not self.results.empty():
            items.append(self.results.get_nowait())
        return items

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _run_workers(coros: list) -> None:
    """Run worker coroutines; the first failure cancels the others and is raised."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _check_prompts(prompts: Any) -> list:
    if isinstance(prompts, str):
        raise ServegenError("prompts must be a list; for one prompt pass [prompt]")
    if not isinstance(prompts, (list, tuple)):
        raise ServegenError(f"prompts must be a list of strings or of chat conversations, got {type(prompts).__name__}")
    if prompts and isinstance(prompts[0], dict):
        raise ServegenError("prompts looks like one chat conversation (a list of messages): pass [messages]")
    return prompts


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def _error_text(data: Any) -> str:
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            value = data.get(key)
            if isinstance(value, dict):
                return _error_text(value)
            if isinstance(value, list):  # FastAPI validation errors
                return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value)
            if value:
                return str(value)
    return str(data)


def _server_message(body: bytes) -> str:
    """The error text of a server's answer: its JSON error message, else the body's start."""
    try:
        return _error_text(json.loads(body))[:1000]
    except ValueError:
        return _snippet(body)


def _snippet(body: bytes, limit: int = 300) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(body) > limit else ""))
