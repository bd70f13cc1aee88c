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
- `mode` injects faults: "500", "429" (Retry-After: `retry_after`), "drop" (connection closed
  with no answer), "truncate" (headers and half a body, then closed), "stall" (no answer for
  `stall_s`, then closed), "malformed" (200 with a body that is not JSON), "401" (refuses the
  key and echoes it back), "chunked" (a correct answer with chunked transfer encoding), "mix"
  (each request: a random fault with probability `fault_rate`, from a seeded generator);
  `fail_first` > 0 limits the faults to each prompt's first `fail_first` requests.

It counts requests and 200 answers per prompt key (`requests`, `answered`; a request with a list
counts once for each of its prompts), the prompts in each HTTP request (`batch_sizes`), records
request bodies and headers, and the most HTTP requests it held at once (`max_in_flight`).
"""

import asyncio
import collections
import json
import random
import socket
import threading

from aiohttp import web

FAULTS = ("500", "429", "drop", "truncate", "stall", "malformed")
CONTEXT_ERROR = (
    "This model's maximum context length is 512 tokens. However, you requested 900 tokens "
    "(600 in the messages, 300 in the completion). Please reduce the length of the messages or completion."
)


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
        self.rng = random.Random(0)
        self.requests: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()
        self.batch_sizes: list[int] = []
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.keep_bodies = True
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
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
        self.requests.clear()
        self.answered.clear()
        self.batch_sizes.clear()
        self.bodies.clear()
        self.headers.clear()
        self.max_in_flight = 0

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
        if self.mode == "mix":
            return self.rng.choice(FAULTS) if self.rng.random() < self.fault_rate else None
        return self.mode

    async def _receive(self, request: web.Request, keys_of) -> tuple[dict, list[str], str | None]:
        """The body, its prompts' keys, and the fault for this request (the first prompt's)."""
        body = await request.json()
        keys = keys_of(body)
        for key in keys:
            self.requests[key] += 1
        self.batch_sizes.append(len(keys))
        if self.keep_bodies:
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
        return body, keys, self._fault(keys[0])

    async def _answer(self, request: web.Request, keys: list[str], fault: str | None, payload) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
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
            if fault == "stall":  # never answers; gives up after stall_s
                await asyncio.sleep(self.stall_s)
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

        def keys_of(body):
            if chat:
                return [body["messages"][-1]["content"]]
            prompt = body["prompt"]
            return list(prompt) if isinstance(prompt, list) else [prompt]

        body, keys, fault = await self._receive(request, keys_of)
        if any("BAD_REQUEST" in key for key in keys):  # FastAPI's shape for a validation error
            return web.json_response({"detail": [{"loc": ["body", "x"], "msg": "field required"}]}, status=422)
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
            if body.get("logprobs"):
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
            "model": body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": 5 * len(keys), "completion_tokens": generated, "total_tokens": 5 * len(keys) + generated},
        }
        return await self._answer(request, keys, fault, payload)

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
        body, [key], fault = await self._receive(request, lambda b: [b["sentences"][0]])
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
        body, [key], fault = await self._receive(request, lambda b: [b["prompts"][0]])
        prompt = body["prompts"][0]
        if not isinstance(body.get("top_p", 0.0), float):
            return web.json_response("top_p must be a positive float less than or equal to 1.0")
        text = self.reply_for(key, self.requests[key] - 1)
        words = text.split(" ")[: body["tokens_to_generate"]]
        text = " ".join(words)
        payload = {"text": [prompt + text], "segments": [[prompt] + words], "tokens": [[0] * (1 + len(words))]}
        return await self._answer(request, [key], fault, payload)
