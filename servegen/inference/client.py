"""The machinery every server type shares: concurrency, retries, timeouts, typed-output retries,
stop phrases, streaming, the sync and async APIs. A server type (openai_compat.py, nemo.py)
only says what a request body looks like and how to read the answer.

Concurrency: a call with N prompts runs min(N, max_concurrent_requests) workers that take the
next prompts as they finish a request, so memory holds the prompts, the results and one request
per worker, never N pending requests. Per event loop (across concurrent calls on one client), a
semaphore bounds the HTTP requests in flight (max_concurrent_requests) and a budget the prompts
in flight: max_concurrent_requests * prompts_per_request, or with max_concurrent_requests=None
(the default) 1024, in up to 1024 requests: 1024 chats or one-prompt requests, 64 requests of
16 string prompts. A worker reserves room for a whole batch before it takes one.

Several prompts per request (prompts_per_request > 1, server types that take a list of string
prompts on /v1/completions): a worker takes up to that many consecutive string prompts with the
same parameters at once and sends them as one request; the server answers one choice per prompt.
Everything else stays per prompt: results, stop phrases, typed-output validation (only the
prompts whose output does not validate are asked again, together), num_generated_tokens (each
choice's token ids; a server that does not return them is an error, not a guess), errors. A
request that fails transiently is retried whole; a 4xx for several prompts is retried prompt by
prompt, so only the prompt at fault (e.g. one over the context length) gets the error.

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
import collections
import dataclasses
import email.utils
import json
import random
import re
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
    ModelUnknown,
    RequestRejected,
    RetriesExhausted,
    redact,
)
from servegen.inference.transport import TransportError, connects, make_transport
from servegen.inference.options import ClientOptions
from servegen.inference.params import Params, Plan
from servegen.inference.scheduling import DONE, IterJob, LoopState, run_workers
from servegen.inference.sync_bridge import SyncBridge

_CONTEXT_LENGTH = re.compile(
    r"context length|context window|maximum model length|max_model_len|max_seq_len|too long|"
    r"exceeds? the max|longer than the max|context_length_exceeded|MaxSequenceLengthOverflow",
    re.IGNORECASE,
)


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once: cheaper per call


def _body_bytes(body: dict) -> bytes:
    """A request body as UTF-8 JSON; a prompt holding a lone surrogate (half of a UTF-16 pair, as
    json.loads gives for "\\ud800") is the caller's mistake, said in one line."""
    try:
        return _encode(body).encode()
    except UnicodeEncodeError as e:
        raise ServegenError(
            f"a prompt or parameter holds \\u{ord(e.object[e.start]):04x}, half of a UTF-16 surrogate pair "
            "and not a character: it cannot be sent"
        ) from None


# every field a result row can have (generate's docstring says which when)
RESULT_FIELDS = ("generation", "num_generated_tokens", "finish_reason", "output", "tokens", "logprobs",
                 "top_logprobs", "error")

# max_concurrent_requests=None: at most this many prompts in flight, in at most as many requests
# (1024 requests of one prompt, 64 of 16): batching does not multiply the prompts queued at the
# server (and their wait), and chats, never batched, keep their 1024 requests
PROMPTS_IN_FLIGHT = 1024


class _Secret:
    """A value that shows as *** in reprs, vars() and debuggers."""

    __slots__ = ("value",)

    def __init__(self, value: str | None):
        self.value = value

    def __repr__(self) -> str:
        return "'***'" if self.value else "None"


class _Retries:
    """The attempts at one request, for both the plain and the streaming path: a try that fails
    transiently awaits `failed(problem, retry_after)`, which waits the backoff before the next
    try, or raises RetriesExhausted after the last (max_retries retries)."""

    __slots__ = ("client", "what", "attempt")

    def __init__(self, client: "Client", method: str, path: str):
        self.client, self.what, self.attempt = client, f"{method} {client.base_url}{path}", 0

    async def failed(self, problem: str, retry_after: float | None = None) -> None:
        c = self.client
        if self.attempt >= c.max_retries:
            raise RetriesExhausted(c._redact(f"{self.what} failed {self.attempt + 1} times; last: {problem}"))
        await asyncio.sleep(c._backoff(self.attempt, retry_after))
        self.attempt += 1


class Client:
    """A model server of one type. Use `get_model(...)` to make one."""

    server_type = "openai"
    discovers_model = True  # model=None: ask GET /v1/models
    # None: the server takes several string prompts in one request and says each one's token
    # count (build_batch_request / parse_batch_response); else why it cannot
    unbatched_because: str | None = "its API takes one prompt per request"
    default_prompts_per_request = 1

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        **options,
    ):
        """options: ClientOptions' fields (servegen/inference/options.py)."""
        opts = ClientOptions.of(options)
        max_concurrent_requests, transport = opts.max_concurrent_requests, opts.transport
        prompts_per_request = opts.prompts_per_request or self.default_prompts_per_request
        if prompts_per_request > 1 and self.unbatched_because is not None:
            raise ServegenError(
                f"server_type {self.server_type} cannot take several prompts per request ({self.unbatched_because}); "
                "use prompts_per_request=1"
            )
        if max_concurrent_requests is None:
            max_concurrent_requests = prompts_in_flight = PROMPTS_IN_FLIGHT
            if prompts_per_request > prompts_in_flight:
                raise ServegenError(
                    f"prompts_per_request={prompts_per_request} is more than the {prompts_in_flight} prompts in "
                    "flight that max_concurrent_requests=None allows; set max_concurrent_requests too"
                )
        else:
            prompts_in_flight = max_concurrent_requests * prompts_per_request
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
        self.max_concurrent_requests = max_concurrent_requests  # HTTP requests
        self.prompts_per_request = prompts_per_request
        self.max_prompts_in_flight = prompts_in_flight
        self.max_retries = opts.max_retries
        self.timeout = float(opts.timeout)
        self.retry_backoff = opts.retry_backoff
        self.max_backoff = opts.max_backoff
        self.max_output_retries = opts.max_output_retries
        self.soft_fail = opts.soft_fail
        self._transport_kind = transport
        self._states: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState]" = weakref.WeakKeyDictionary()
        self._sync = SyncBridge(new_event_loop)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, api_key={self._api_key!r})"

    # ------------------------------------------------------------------ what a server type says

    def build_request(self, prompt: Any, p: Params, stream: bool = False) -> tuple[str, str, dict]:
        """(method, path, body) of one request."""
        raise NotImplementedError

    def parse_response(self, data: Any, prompt: Any, p: Params) -> dict:
        """A result row {generation, num_generated_tokens, finish_reason, ...} from a 200 body."""
        raise NotImplementedError

    def build_batch_request(self, prompts: list[str], p: Params) -> tuple[str, str, dict]:
        """(method, path, body) of one request for several string prompts (server types with batching)."""
        raise NotImplementedError

    def parse_batch_response(self, data: Any, prompts: list[str], p: Params) -> list[dict]:
        """One result row per prompt, in the prompts' order, from a 200 body; BatchingUnsupported
        when the body lacks what counts each prompt's tokens."""
        raise NotImplementedError

    def parse_stream_event(self, event: dict) -> str:
        """The text in one server-sent event of a stream."""
        raise NotImplementedError

    def check_prompt(self, prompt: Any, p: Params) -> None:
        """ServegenError for what this server type cannot do with this prompt and parameters."""

    # ------------------------------------------------------------------ plumbing

    def _state(self) -> LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            headers = {"User-Agent": "servegen", "Accept": "application/json"}
            if self._api_key.value:
                headers["Authorization"] = f"Bearer {self._api_key.value}"
            transport = make_transport(self.base_url, headers, self.max_concurrent_requests, self._transport_kind)
            state = self._states[loop] = LoopState(transport, self.max_concurrent_requests, self.max_prompts_in_flight)
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

    def _refused(self, status: int, body: bytes, headers: dict, path: str) -> tuple[str, float | None]:
        """A non-2xx answer: (the problem, the server's Retry-After) for a 429 or 5xx, which are
        retried; RequestRejected for any other."""
        if status != 429 and status < 500:
            raise self._rejected(status, body, path)
        return f"HTTP {status}: {_server_message(body)}", _retry_after(headers.get("retry-after"))

    async def _call(self, state: LoopState, method: str, path: str, payload: bytes | None, timeout: float, parse):
        """One request with retries, holding one of the loop's request slots; `parse(json_value)`
        makes the result from a 2xx body, and a body it cannot read (KeyError, TypeError,
        IndexError, ValueError) is a failed attempt."""
        async with state.slots:
            retries = _Retries(self, method, path)
            while True:
                retry_after = None
                try:
                    response = await state.transport.request(method, path, payload, timeout)
                except (TimeoutError, TransportError) as e:
                    problem = _transport_problem(e)
                else:
                    if not 200 <= response.status < 300:
                        problem, retry_after = self._refused(response.status, response.body, response.headers, path)
                    else:
                        try:
                            return parse(json.loads(response.body))
                        except InferenceError:
                            raise
                        except (ValueError, KeyError, TypeError, IndexError) as e:
                            problem = f"unreadable 200 response ({type(e).__name__}: {e}): {_snippet(response.body)}"
                await retries.failed(problem, retry_after)

    async def _ensure_model(self, state: LoopState) -> None:
        if self.model is not None or not self.discovers_model:
            return

        def first_model(data):
            return data["data"][0]["id"]

        try:
            self.model = await self._call(state, "GET", self._prefix + "/v1/models", None, min(self.timeout, 60.0), first_model)
        except InferenceError as e:
            if not connects(self.base_url, retry_for_s=0):  # the requests above were retried already
                raise ModelUnknown(f"nothing answers at {self.base_url}: start the server first (servegen "
                                   "start_server) or fix base_url (or host and port)", str(e)) from None
            raise ModelUnknown(f"cannot find out which model the server serves ({e}); pass model= to get_model", str(e)) from None

    def _attempt_params(self, p: Params, attempt: int) -> Params:
        if attempt and p.random_seed is not None:
            return dataclasses.replace(p, random_seed=p.random_seed + attempt)  # the same seed, the same answer
        return p

    def _finish(self, row: dict, q: Params) -> str | None:
        """Trim the row's stop phrase and parse its typed output; why the output is invalid, or None."""
        if q.stop_phrases:
            text, found = stops.trim(row["generation"], q.stop_phrases, not q.remove_stop_phrases)
            if found:
                row["generation"] = text
                row["finish_reason"] = "stop"
        if q.spec is not None:
            try:
                row["output"] = q.spec.parse(row["generation"])
            except ValueError as e:
                return str(e)
        return None

    def _invalid(self, why: str, row: dict) -> InvalidOutput:
        attempts = 1 + self.max_output_retries
        return InvalidOutput(f"the generation is not a valid typed output after {attempts} attempts: {why}",
                             row["generation"], num_generated_tokens=row["num_generated_tokens"])

    async def _generate_one(self, state: LoopState, prompt: Any, p: Params, first_attempt: int = 0) -> dict:
        """One prompt, retried as a whole when its typed output does not validate."""
        self.check_prompt(prompt, p)
        timeout = p.timeout or self.timeout
        for attempt in range(first_attempt, 1 + (self.max_output_retries if p.spec is not None else 0)):
            q = self._attempt_params(p, attempt)
            method, path, body = self.build_request(prompt, q)
            payload = _body_bytes(body)
            row = await self._call(state, method, self._prefix + path, payload, timeout, lambda d: self.parse_response(d, prompt, q))
            why = self._finish(row, q)
            if why is None:
                return row
        raise self._invalid(why, row)

    async def _generate_batch(self, state: LoopState, prompts: list[str], p: Params, first_attempt: int = 0) -> list:
        """Several string prompts that share `p` in one request per attempt: one result per
        prompt, a row or the InferenceError it ended in. A typed output that does not validate is
        asked again, together with the others that did not; a 4xx is retried prompt by prompt, so
        that only the one at fault gets the error; a request that fails for good fails each of
        its prompts."""
        for prompt in prompts:
            self.check_prompt(prompt, p)
        q = self._attempt_params(p, first_attempt)
        method, path, body = self.build_batch_request(prompts, q)
        payload = _body_bytes(body)
        try:
            rows = await self._call(state, method, self._prefix + path, payload, p.timeout or self.timeout,
                                    lambda d: self.parse_batch_response(d, prompts, q))
        except RequestRejected:  # each prompt alone (each takes a request slot of its own)
            return list(await asyncio.gather(*(self._settle(self._generate_one(state, x, p, first_attempt)) for x in prompts)))
        except InferenceError as e:
            return [e] * len(prompts)
        invalid = {i: why for i, row in enumerate(rows) if (why := self._finish(row, q)) is not None}
        if invalid and first_attempt < self.max_output_retries:  # asked again, together
            again = [prompts[i] for i in invalid]
            if len(again) > 1:
                redone = await self._generate_batch(state, again, p, first_attempt + 1)
            else:
                redone = [await self._settle(self._generate_one(state, again[0], p, first_attempt + 1))]
            for i, result in zip(invalid, redone):
                rows[i] = result
        elif invalid:
            for i, why in invalid.items():
                rows[i] = self._invalid(why, rows[i])
        return rows

    @staticmethod
    async def _settle(coro) -> Any:
        """The coroutine's result, or the InferenceError it raised."""
        try:
            return await coro
        except InferenceError as e:
            return e

    async def _rows(self, state: LoopState, prompts: list, p: Params, indices, soft_fail: bool) -> list:
        """The rows of prompts at these positions of the call (one request, or one of several
        prompts), with a failed prompt's error as a row (soft_fail) or as its InferenceError,
        naming the prompt."""
        if len(prompts) == 1:
            try:
                return [await self._generate_one(state, prompts[0], p)]
            except InferenceError as e:
                out = [e]
        else:
            out = await self._generate_batch(state, prompts, p)
        for k, result in enumerate(out):
            if isinstance(result, InferenceError):
                error = result.for_prompt(indices[k])
                if soft_fail:
                    # a typed output that did not validate keeps its last text and the tokens it took
                    invalid = isinstance(error, InvalidOutput)
                    row = {"generation": error.generation if invalid else None,
                           "num_generated_tokens": (error.num_generated_tokens or 0) if invalid else 0,
                           "finish_reason": "error", "error": str(error)}
                    if p.spec is not None:
                        row["output"] = None
                    out[k] = row
                else:
                    out[k] = error
        return out

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
        size = self.prompts_per_request
        cursor = 0

        def take() -> tuple[range, Params]:
            """The next prompts to send together: up to `size` consecutive string prompts with
            the same parameters (one prompt when it is a chat or size is 1)."""
            nonlocal cursor
            start = end = cursor
            p = plan.params(start)
            end += 1
            if size > 1 and isinstance(prompts[start], str):
                limit = min(n, start + size)
                while end < limit and isinstance(prompts[end], str) and (plan.shared is not None or plan.params(end) == p):
                    end += 1
            cursor = end
            return range(start, end), p

        async def worker():
            budget = state.budget
            while cursor < n:
                if not budget.take(size):
                    await budget.reserve(size)  # room first, then the prompts (no pause in between)
                if cursor >= n:
                    budget.release(size)
                    return
                try:
                    indices, p = take()
                except BaseException:
                    budget.release(size)
                    raise
                if len(indices) < size:
                    budget.release(size - len(indices))
                try:
                    rows = await self._rows(state, prompts[indices.start : indices.stop], p, indices, soft)
                finally:
                    budget.release(len(indices))
                for row in rows:
                    if isinstance(row, BaseException):
                        raise row
                results[indices.start : indices.stop] = rows

        await run_workers([worker() for _ in range(min(n, self.max_concurrent_requests))])
        return results

    async def generate_one_async(self, prompt: Any, soft_fail: bool | None = None, **params) -> dict:
        """One prompt (scalar parameters only), for callers that schedule requests themselves."""
        plan = Plan(None, params)
        state = self._state()
        await self._ensure_model(state)
        await state.budget.reserve(1)
        try:
            [row] = await self._rows(state, [prompt], plan.shared, [0], self.soft_fail if soft_fail is None else soft_fail)
        finally:
            state.budget.release(1)
        if isinstance(row, BaseException):
            raise row
        return row

    async def generate_iter_async(
        self, prompts: Iterable | AsyncIterable, soft_fail: bool | None = None, **params
    ) -> AsyncIterator[tuple[int, dict]]:
        """(index, result) pairs as requests complete, reading `prompts` lazily: at most
        max_prompts_in_flight prompts are in flight (and one batch being gathered), at most as
        many finished results wait for the consumer, and a consumer that stops reading stops
        the reading of prompts too. Items are prompts or dicts {"prompt": ..., <parameter>:
        <value>, ...} with per-row parameters. Parameters given here are scalars for every row.

        A batch is gathered from the source under one lock, so only the newest items taken can
        wait in a batch not yet sent: a source that blocks until older items finish (e.g. a
        window of W items past the oldest unfinished one) cannot deadlock as long as
        W >= prompts_per_request, and loses no throughput when W >= max_prompts_in_flight +
        prompts_per_request."""
        job = IterJob(self, prompts, Plan(None, params), self.soft_fail if soft_fail is None else soft_fail)
        await job.start()
        try:
            while True:
                item = await job.results.get()
                if item is DONE:
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
        await state.budget.reserve(1)
        try:
            async with state.slots:
                async for piece in self._stream_pieces(state, prompt, p):
                    yield piece
        finally:
            state.budget.release(1)

    async def _stream_pieces(self, state: LoopState, prompt: Any, p: Params) -> AsyncIterator[str]:
        method, path, body = self.build_request(prompt, p, stream=True)
        path = self._prefix + path
        payload = _body_bytes(body)
        timeout = p.timeout or self.timeout
        trimmer = stops.StreamTrimmer(p.stop_phrases, not p.remove_stop_phrases)
        retries = _Retries(self, method, path)
        while True:
            retry_after = None
            response = state.transport.stream(method, path, payload, timeout)
            try:
                await response.__aenter__()
            except (TimeoutError, TransportError) as e:
                problem = _transport_problem(e)
            else:
                try:
                    if not 200 <= response.status < 300:
                        problem, retry_after = self._refused(response.status, await response.read(), response.headers, path)
                    else:  # once text has come, a break is not retried: it would be shown twice
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
                except (TimeoutError, TransportError) as e:
                    raise InferenceError(self._redact(f"the stream from {self.base_url}{path} broke: {e}")) from None
                finally:
                    await response.__aexit__(None, None, None)
            await retries.failed(problem, retry_after)

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
        temperature: float | None | list = None,
        top_p: float | None | list = None,
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
        The sampling parameters are servegen.inference.params.Sampling's (defaults, rules):
        temperature and top_p unset are greedy, or 0.7 and 0.95 with a random_seed.
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
        loop = self._sync.loop()
        job = IterJob(self, prompts, Plan(None, params), self.soft_fail if soft_fail is None else soft_fail)
        self._run(job.start())
        try:
            while True:
                for item in self._run(job.take_ready()):
                    if item is DONE:
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
        self._sync.close(self.aclose)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coro):
        return self._sync.run(coro)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (less CPU per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _transport_problem(e: BaseException) -> str:
    """What a failed connection or a timeout says in the error after the last retry."""
    return f"timed out: {e}" if isinstance(e, TimeoutError) else str(e)


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
