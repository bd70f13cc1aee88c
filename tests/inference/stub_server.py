"""A fault-injecting model server for the client tests: a real HTTP server (aiohttp.web, in a
thread with its own event loop) on a free loopback port.

It speaks the OpenAI protocol (/v1/completions, /v1/chat/completions with and without
streaming, /v1/models, and vLLM's /health) and the request/response shapes of NeMo's PUT /generate and Megatron-LM's
PUT /api, as documented in servegen/inference/nemo.py. What it answers:

- the reply to a prompt is `replies[key]` if set (a string, or a list of strings: one per
  attempt, the last one repeating), else "reply to <key>"; the key is the prompt string, or the
  last chat message's content;
- /v1/completions takes a list of prompts as vLLM does: one choice per prompt, in order, with
  its `index`, and with `return_token_ids` each choice's `token_ids` (one per word, as the
  usage counts words); the usage is the request's total. `token_ids=False` leaves them out
  (a server that cannot say each prompt's token count);
- a prompt containing TOO_LONG gets vLLM's 400 for a prompt over the context length, one
  containing BAD_REQUEST a 422 in FastAPI's shape (in a list: the whole request, as vLLM);
- to a request of a megatron_openai client (its X-Stub-Server-Type header), the shape of
  Megatron-LM's launch_inference_server.py (endpoints/completions.py, chat_completions.py): each
  completion choice with its generation_token_ids unasked and prompt_token_ids, completion
  logprobs with a None first (as it puts one even without echo), model "EMPTY", and errors as
  text (Quart's answer to a handler's string), a prompt over the context length as its
  MaxSequenceLengthOverflowError;
- `mode` injects faults: "500", "429" (Retry-After: `retry_after`), "drop" (connection closed
  with no answer), "truncate" (headers and half a body, then closed), "stall" (no answer until
  the client gives up and closes the connection, or for at most `stall_s`; then closed),
  "malformed" (200 with a body that is not JSON), "401" (refuses the key and echoes it back),
  "chunked" (a correct answer with chunked transfer encoding), "mix" (each request: a random
  fault with probability `fault_rate`, drawn from a generator seeded with `seed`, the prompt key
  and the request's number for that key, so that a prompt meets the same faults whatever order
  the requests arrive in); `fail_first` > 0 limits the faults to each prompt's first `fail_first`
  requests.

It counts requests and 200 answers per prompt key (`requests`, `answered`; a request with a list
counts once for each of its prompts), the prompts in each HTTP request (`batch_sizes`), records
request bodies and headers, the HTTP requests it holds now and the most it held at once
(`in_flight`, `max_in_flight`).

Holding answers, for tests that must see requests in flight without racing a delay: with
`hold_all = True` (or a request whose prompt key is in `held`) a request waits, in flight and
counted in `holding`, until `release()`; a test waits for what must happen with `eventually(...)`
and then releases. `reset()` releases whatever is still held and ends the release.

Strict mode (`strict`): every request body is validated against the JSON schema of an engine's
documented request (tests/inference/schemas/<engine>.json, which says where each one comes from):
`strict = "sglang"` validates every request as SGLang's; `strict = "auto"` (what the `stub`
fixture sets) validates each request as the engine its client is for, named by the
`X-Stub-Server-Type` header that the fixture makes each servegen client send (an engine without a
schema file, such as hf, is not validated). A body that does not match (a field the engine does
not document, a value of the wrong type or out of its documented range) gets HTTP 400 naming the
field, in that engine's error shape, and is recorded in `schema_errors`; `None` (the default)
reads only the fields it needs, as before.
"""

import asyncio
import collections
import json
import random
import socket
import threading
import time
from pathlib import Path

import jsonschema
from aiohttp import web

FAULTS = ("500", "429", "drop", "truncate", "stall", "malformed")
# Megatron-LM's completions endpoint on a prompt over the context length (the engine's error event, as a dict)
MEGATRON_CONTEXT_ERROR = ("Inference request(s) failed: Request 0: {'type': 'MaxSequenceLengthOverflowError', "
                          "'request_id': 7, 'message': None, 'is_transient': False}")
CONTEXT_ERROR = (
    "This model's maximum context length is 512 tokens. However, you requested 900 tokens "
    "(600 in the messages, 300 in the completion). Please reduce the length of the messages or completion."
)
SERVER_TYPE_HEADER = "X-Stub-Server-Type"  # which engine's schema a request is validated against
SCHEMA_DIR = Path(__file__).parent / "schemas"


def load_schemas() -> dict[str, dict[str, jsonschema.protocols.Validator]]:
    """{engine: {"POST /v1/completions": validator, ...}} from tests/inference/schemas/*.json (each
    endpoint's schema with its "#/$defs/..." references put in place: twice as fast to check)."""
    out = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        validators = {}
        for route, name in doc["endpoints"].items():
            root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": doc["$defs"], "$ref": f"#/$defs/{name}"}
            jsonschema.Draft202012Validator.check_schema(root)
            validators[route] = jsonschema.Draft202012Validator(_inline(doc["$defs"][name], doc["$defs"]))
        out[doc["engine"]] = validators
    return out


def _inline(node, defs: dict):
    if isinstance(node, dict):
        if set(node) == {"$ref"} and node["$ref"].startswith("#/$defs/"):
            return _inline(defs[node["$ref"][len("#/$defs/"):]], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


SCHEMAS = load_schemas()
_CHECKED: dict[tuple, list[str]] = {}  # bodies that differ only in their prompts' text are checked once


def schema_problems(engine: str, route: str, body) -> list[str]:
    """What is wrong with a request body by the engine's schema, one line per problem, each naming
    the field ([] when it matches)."""
    validators = SCHEMAS[engine]
    if route not in validators:
        return [f"{route}: not an endpoint of {engine}"]
    key = (engine, route, _shape(body))
    problems = _CHECKED.get(key)
    if problems is None:
        problems = []
        for error in sorted(validators[route].iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
            best = jsonschema.exceptions.best_match([error])  # the deepest reason of an anyOf / oneOf
            problems.append(_describe(best))
        if len(_CHECKED) > 100_000:
            _CHECKED.clear()
        _CHECKED[key] = problems
    return list(problems)


def _shape(body) -> str:
    """The body as the schemas see it: the text of prompts and of chat messages is never
    constrained (only that it is text, and a message's role), so it is left out."""
    if not isinstance(body, dict):
        return json.dumps(body)
    shaped = dict(body)
    prompt = body.get("prompt", body.get("sentences", body.get("prompts")))
    for field in ("prompt", "sentences", "prompts"):
        if field in body:
            shaped[field] = _text_shape(prompt)
    if isinstance(body.get("messages"), list):
        shaped["messages"] = [
            {k: (_text_shape(v) if k == "content" else v) for k, v in m.items()} if isinstance(m, dict) else m
            for m in body["messages"]
        ]
    return json.dumps(shaped, sort_keys=True)


def _text_shape(value):
    if isinstance(value, str):
        return ""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [""] * len(value)
    return value


def _describe(error: jsonschema.ValidationError) -> str:
    where = "body" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
    if error.validator in ("maxItems", "maxLength"):  # (not "is too long": a client reads that as the context length)
        return f"{where}: at most {error.validator_value} allowed, got {len(error.instance)}"
    message = error.schema.get("description", error.message) if error.validator == "not" else error.message
    return f"{where}: {message if len(message) <= 300 else message[:300] + '...'}"


def prompt_keys(path: str, body: dict) -> list[str]:
    """The prompt keys of a request body, as the stub counts and answers them: each completions
    prompt, a chat's last message, NeMo's and Megatron-LM's first prompt."""
    if path.endswith("/chat/completions"):
        return [body["messages"][-1]["content"]]
    if path.endswith("/completions"):
        prompt = body["prompt"]
        return list(prompt) if isinstance(prompt, list) else [prompt]
    if path.endswith("/generate"):
        return [body["sentences"][0]]
    return [body["prompts"][0]]  # /api


def eventually(predicate, timeout_s: float = 60.0, what: str = "the condition", interval_s: float = 0.005):
    """Wait until predicate() is true, polling (for a state of the stub a test needs before it goes
    on); AssertionError naming `what` after timeout_s, a deadline far beyond any normal run."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(interval_s)


class StubServer:
    def __init__(self, model: str = "stub-model"):
        self.model = model
        self.mode = "ok"
        self.fail_first = 0  # 0: every request of the mode is a fault
        self.fault_rate = 0.3
        self.retry_after = "0"
        self.stall_s = 5.0
        self.delay_s = 0.0  # before every answer
        self.models_status = 200
        self.token_ids = True  # answer return_token_ids
        self.replies: dict[str, object] = {}
        self.seed = 0  # of the faults "mix" draws
        self.requests: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()
        self.batch_sizes: list[int] = []
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.keep_bodies = True
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self.hold_all = False  # hold every request until release()
        self.held: set[str] = set()  # hold the requests of these prompt keys until release()
        self.released = threading.Event()
        self.holding = 0  # requests held now
        self._gate = asyncio.Event()  # set (in the server's loop) by release()
        self.strict: str | None = None  # None, an engine with a schema file, or "auto" (per request)
        self.schema_errors: list[str] = []
        self.validated: collections.Counter = collections.Counter()  # request bodies checked, per engine
        self._loop = None
        self._runner = None
        self._thread = None

    # -- life --

    def start(self, port: int | None = None) -> "StubServer":
        """Serve on `port` (default: a free one)."""
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.base_url = f"http://127.0.0.1:{self.port}"
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10), "stub server did not start"
        return self

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._openai)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_put("/generate", self._nemo)
        app.router.add_put("/api", self._megatron)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096)
        self._loop.run_until_complete(site.start())
        ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        pending = asyncio.all_tasks(self._loop)  # stalled handlers
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def stop(self) -> None:  # once or more
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def reset(self) -> None:
        """Counters and records cleared, and whatever is held let go (schema_errors stay: the
        fixture checks them after the test)."""
        self.requests.clear()
        self.answered.clear()
        self.batch_sizes.clear()
        self.bodies.clear()
        self.headers.clear()
        self.max_in_flight = 0
        self.validated.clear()
        self.hold_all = False
        self.held.clear()
        old, self._gate = self._gate, asyncio.Event()
        self.released.clear()
        self._set_gate(old)  # the requests held until now are answered

    def release(self) -> None:
        """Answer the held requests, and hold none from now until reset()."""
        self.released.set()
        self._set_gate(self._gate)

    def _set_gate(self, gate: asyncio.Event) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(gate.set)

    # -- behaviour --

    def reply_for(self, key: str, attempt: int) -> str:
        reply = self.replies.get(key, f"reply to {key}")
        if isinstance(reply, list):
            return reply[min(attempt, len(reply) - 1)]
        return reply

    def _fault(self, key: str) -> str | None:
        if self.mode in ("ok", "chunked"):
            return None
        if self.mode == "401":
            return "401"
        if self.fail_first and self.requests[key] > self.fail_first:
            return None
        if self.mode == "mix":  # drawn per prompt and request number: the same whatever the arrival order
            rng = random.Random(f"{self.seed}:{key}:{self.requests[key]}")
            return rng.choice(FAULTS) if rng.random() < self.fault_rate else None
        return self.mode

    async def _receive(self, request: web.Request) -> tuple[dict, list[str], str | None, web.Response | None]:
        """The body, its prompts' keys, the fault for this request (the first prompt's), and in
        strict mode the 400 for a body that does not match the engine's schema (else None)."""
        body = await request.json()
        rejection = self._check_schema(request, body)
        try:
            keys = prompt_keys(request.path, body)
        except (KeyError, IndexError, TypeError):
            if rejection is None:
                raise
            keys = []
        for key in keys:
            self.requests[key] += 1
        self.batch_sizes.append(len(keys))
        if self.keep_bodies:
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
        return body, keys, None if rejection is not None else self._fault(keys[0]), rejection

    def _check_schema(self, request: web.Request, body) -> web.Response | None:
        if self.strict is None:
            return None
        engine = request.headers.get(SERVER_TYPE_HEADER) if self.strict == "auto" else self.strict
        route = f"{request.method} {request.path}"
        if engine is None:
            problems = [f"strict stub: the request does not say its server type ({SERVER_TYPE_HEADER} header)"]
            engine = "vllm"  # for the shape of the answer
        elif engine not in SCHEMAS:
            if self.strict == "auto":
                return None  # (hf): no schema to check it against
            raise ValueError(f"no schema for engine {engine!r} in {SCHEMA_DIR}")
        else:
            problems = schema_problems(engine, route, body)
            self.validated[engine] += 1
        if not problems:
            return None
        message = f"the request does not match {engine}'s schema: " + "; ".join(problems)
        self.schema_errors.append(f"{route} ({engine}): " + "; ".join(problems))
        if engine == "openai":  # the hosted API: "Unrecognized request argument supplied: X"
            payload = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        elif engine == "vllm":
            payload = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
        elif engine in ("sglang", "trtllm"):
            payload = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
        elif engine == "megatron_openai":  # Quart sends a handler's string as the body
            return web.Response(text=message, status=400)
        else:  # NeMo's and Megatron-LM's Flask servers answer a message string
            payload = message
        return web.json_response(payload, status=400)

    async def _answer(self, request: web.Request, keys: list[str], fault: str | None, payload) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            gate = self._gate  # (before the check: a reset or release after it sets this gate)
            if (self.hold_all or any(key in self.held for key in keys)) and not self.released.is_set():
                self.holding += 1
                try:
                    await gate.wait()
                finally:
                    self.holding -= 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if fault == "500":
                return web.json_response({"error": {"message": "injected server error"}}, status=500)
            if fault == "429":
                return web.json_response(
                    {"error": {"message": "too many requests"}}, status=429, headers={"Retry-After": self.retry_after}
                )
            if fault == "drop":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if fault == "truncate":
                text = json.dumps(payload).encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(text)
                request.transport.write(head + text[: len(text) // 2])
                await asyncio.sleep(0.01)
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if fault == "stall":  # never answers; gives up when the client does, or after stall_s
                deadline = time.monotonic() + self.stall_s
                while time.monotonic() < deadline and request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if fault == "401":  # a server that echoes the key it refused
                auth = request.headers.get("Authorization", "")
                return web.json_response({"error": {"message": f"invalid key in {auth!r}"}}, status=401)
            if fault == "malformed":
                return web.Response(body=b'{"choices": [{"text": "unfinished', content_type="application/json")
            for key in keys:
                self.answered[key] += 1
            if self.mode == "chunked":
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                response.enable_chunked_encoding()
                await response.prepare(request)
                text = json.dumps(payload).encode()
                for i in range(0, len(text), 7):
                    await response.write(text[i : i + 7])
                await response.write_eof()
                return response
            return web.json_response(payload)
        finally:
            self.in_flight -= 1

    # -- endpoints --

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            return web.json_response({"error": "models listing broken"}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("chat/completions")
        megatron_openai = request.headers.get(SERVER_TYPE_HEADER) == "megatron_openai"

        body, keys, fault, rejection = await self._receive(request)
        if rejection is not None:
            return rejection
        if any("BAD_REQUEST" in key for key in keys):  # FastAPI's shape for a validation error
            return web.json_response({"detail": [{"loc": ["body", "x"], "msg": "field required"}]}, status=422)
        if megatron_openai and any("TOO_LONG" in key for key in keys):
            return web.Response(text=MEGATRON_CONTEXT_ERROR, status=400)
        if any("TOO_LONG" in key for key in keys):
            return web.json_response(
                {"object": "error", "message": CONTEXT_ERROR, "type": "BadRequestError", "param": None, "code": 400},
                status=400,
            )
        choices = []
        for index, key in enumerate(keys):
            text = self.reply_for(key, self.requests[key] - 1)
            stops = body.get("stop") or []
            finish = "length" if len(text.split()) >= body.get("max_tokens", 16) else "stop"
            for stop in stops:
                if stop in text:
                    text = text[: text.index(stop) + (len(stop) if body.get("include_stop_str_in_output") else 0)]
                    finish = "stop"
            if body.get("stream") and fault is None:
                return await self._stream(request, key, text, chat)
            choice = {"index": index, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if megatron_openai and not chat:
                self._megatron_choice(choice, text, body)
            elif body.get("logprobs"):
                tokens = text.split(" ")
                if chat:
                    choice["logprobs"] = {
                        "content": [
                            {"token": t, "logprob": -0.5, "top_logprobs": [{"token": t, "logprob": -0.5}]} for t in tokens
                        ]
                    }
                else:
                    choice["logprobs"] = {
                        "tokens": tokens,
                        "token_logprobs": [-0.5] * len(tokens),
                        "top_logprobs": [{t: -0.5} for t in tokens],
                    }
            if body.get("return_token_ids") and self.token_ids:
                choice["token_ids"] = list(range(len(text.split())))
            choices.append(choice)
        generated = sum(len((c["message"]["content"] if chat else c["text"]).split()) for c in choices)
        payload = {
            "id": "cmpl-1",
            "object": "chat.completion" if chat else "text_completion",
            "model": "EMPTY" if megatron_openai else body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": 5 * len(keys), "completion_tokens": generated, "total_tokens": 5 * len(keys) + generated},
        }
        return await self._answer(request, keys, fault, payload)

    def _megatron_choice(self, choice: dict, text: str, body: dict) -> None:
        """Megatron-LM's extras of a completion choice: token ids unasked, and logprobs (logprobs: an
        int, 0 included) with a None first."""
        tokens = text.split(" ")
        if body.get("logprobs") is not None:
            choice["logprobs"] = {
                "token_logprobs": [None] + [-0.5] * len(tokens),
                "tokens": tokens,
                "text_offset": [],
                "top_logprobs": [None] + [{t: -0.5} for t in tokens] if body["logprobs"] else None,
            }
        choice["prompt_token_ids"] = [0] * 5
        if self.token_ids:
            choice["generation_token_ids"] = list(range(len(text.split())))

    async def _stream(self, request: web.Request, key: str, text: str, chat: bool) -> web.StreamResponse:
        self.answered[key] += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
        if chat:
            await response.write(b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n')
        for piece in pieces:
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _nemo(self, request: web.Request) -> web.StreamResponse:
        body, keys, fault, rejection = await self._receive(request)
        if rejection is not None:
            return rejection
        [key] = keys
        prompt = body["sentences"][0]
        text = self.reply_for(key, self.requests[key] - 1)
        end_strings = body.get("end_strings") or ["<|endoftext|>"]
        stopped = False
        for end in end_strings:
            if end in text:  # NeMo stops after an end string and keeps it
                text = text[: text.index(end) + len(end)]
                stopped = True
        if not stopped:
            text = " ".join(text.split(" ")[: body["tokens_to_generate"]])
        sentence = prompt + text
        tokens = [prompt] + [w for w in text.split(" ") if w]  # the prompt as one token, then words
        payload = {"sentences": [sentence], "tokens": [tokens], "logprob": None, "token_ids": [[0] * len(tokens)]}
        return await self._answer(request, [key], fault, payload)

    async def _megatron(self, request: web.Request) -> web.StreamResponse:
        body, keys, fault, rejection = await self._receive(request)
        if rejection is not None:
            return rejection
        [key] = keys
        prompt = body["prompts"][0]
        # the server's checks in its order, answered as it does (HTTP 200, a message string)
        if not isinstance(body.get("top_p", 0.0), float):
            return web.json_response("top_p must be a positive float less than or equal to 1.0")
        if body.get("top_p", 0.0) > 0.0 and body.get("top_k", 0) > 0:
            return web.json_response("cannot set both top-k and top-p samplings.")
        text = self.reply_for(key, self.requests[key] - 1)
        words = text.split(" ")[: body["tokens_to_generate"]]
        text = " ".join(words)
        payload = {"text": [prompt + text], "segments": [[prompt] + words], "tokens": [[0] * (1 + len(words))]}
        return await self._answer(request, [key], fault, payload)
