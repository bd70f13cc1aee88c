"""NeMo's and Megatron-LM's own text-generation REST servers (not the OpenAI protocol).

These servers need GPUs and cannot run on the machines servegen is tested on: this client is
tested against a local stub that follows the request and response shapes below (taken from the
servers' sources), never against the real servers.

NeMo (`megatron_gpt_eval.py server=True`, nemo.collections.nlp...text_generation_server):
    PUT /generate {"sentences": [...], "tokens_to_generate", "temperature" (in (0, 100]),
    "greedy", "top_k" (0: off), "top_p", "repetition_penalty" (>= 1), "add_BOS",
    "all_probs", "compute_logprob", "end_strings", "min_tokens_to_generate", "random_seed"}
    -> {"sentences": [prompt + generation], "tokens": [[token, ...]], "offsets": [[...]], ...}
Megatron-LM (tools/run_text_generation_server.py):
    PUT /api {"prompts": [...], "tokens_to_generate", "temperature" (in (0, 100]), "top_k"
    (0..1000), "top_p" (a float, not together with top_k), "add_BOS", "logprobs", "random_seed"}
    -> {"text": [prompt + generation], "segments": [[token, ...]], "tokens": [[id, ...]], ...}
Both answer a bad parameter with HTTP 200 and a JSON string (the message), which we raise as
RequestRejected. Both return prompt + generation, and so does the text we cut the prompt off:
like the servers' own OpenAI-style endpoints we drop the first len(prompt) characters.
num_generated_tokens counts the returned tokens that start at or after len(prompt) characters:
exact when detokenising the prompt gives the prompt back, approximate otherwise.

Only string prompts (build them with a prompt template); one prompt per request (the servers
run one request at a time behind a lock, so throughput comes from their batch, not ours: see
docs/clients.md). No logprobs, no min_p, no structured decoding (typed outputs are validated and
retried on the client), no streaming (stream() yields the whole generation once). Megatron-LM
has no stop strings: stop phrases are trimmed on the client; greedy is top_k=1, and it takes no
repetition_penalty.
"""

from typing import Any

from servegen.errors import ServegenError
from servegen.inference.client import Client
from servegen.inference.errors import RequestRejected
from servegen.inference.params import Params

NEMO_END_STRING = "<|endoftext|>"  # NeMo's default end string; passing end_strings replaces it


class _RestClient(Client):
    discovers_model = False

    def check_prompt(self, prompt: Any, p: Params) -> None:
        if not isinstance(prompt, str):
            raise ServegenError(
                f"server_type {self.server_type} takes string prompts only; build them with a prompt template "
                "(servegen.prompt) instead of chat messages"
            )
        if p.top_logprobs is not None:
            raise ServegenError(f"server_type {self.server_type}: top_logprobs is not supported")
        if p.min_p:
            raise ServegenError(f"server_type {self.server_type}: min_p is not supported")

    def parse_response(self, data: Any, prompt: Any, p: Params) -> dict:
        if isinstance(data, str):  # a parameter the server refused, sent as a 200
            raise RequestRejected(f"{self.server_type} server rejected the request: {self._redact(data)}", 200)
        full, pieces = self.full_text_and_tokens(data)
        text = full[len(prompt) :]
        end = len(text)
        found = False
        for phrase in self.end_strings(p):
            i = text.find(phrase)
            if 0 <= i < end:
                end, found = i, True
        n = _tokens_after(pieces, len(prompt))
        if found:
            text, reason = text[:end], "stop"
        else:
            reason = "length" if n >= p.tokens_to_generate else "stop"
        return {"generation": text, "num_generated_tokens": n, "finish_reason": reason}

    def end_strings(self, p: Params) -> tuple[str, ...]:
        return ()

    def full_text_and_tokens(self, data: dict) -> tuple[str, list[str]]:
        raise NotImplementedError

    def parse_stream_event(self, event: dict) -> str:
        raise NotImplementedError  # stream_async below never reads events

    async def stream_async(self, prompt: Any, **params):
        # no streaming API: the whole generation as one piece, after the same checks and retries
        result = await self.generate_one_async(prompt, **params)
        if result["generation"]:
            yield result["generation"]


class NemoClient(_RestClient):
    server_type = "nemo"

    def build_request(self, prompt: Any, p: Params, stream: bool = False) -> tuple[str, str, dict]:
        if p.repetition_penalty < 1.0:
            raise ServegenError("server_type nemo: repetition_penalty must be >= 1.0")
        body = {
            "sentences": [prompt],
            "tokens_to_generate": p.tokens_to_generate,
            # temperature must be > 0 even when greedy
            "temperature": p.temperature if p.temperature > 0 else 1.0,
            "greedy": p.temperature == 0,
            "top_k": p.top_k,
            "top_p": p.top_p,
            "repetition_penalty": p.repetition_penalty,
            "add_BOS": False,
            "all_probs": False,
            "compute_logprob": False,
            "end_strings": [NEMO_END_STRING, *p.stop_phrases],
            "min_tokens_to_generate": 0,
        }
        if p.random_seed is not None:
            body["random_seed"] = p.random_seed
        if p.extra_body:
            body.update(p.extra_body)
        return "PUT", "/generate", body

    def end_strings(self, p: Params) -> tuple[str, ...]:
        return (NEMO_END_STRING,)  # it stops after it and leaves it in the text

    def full_text_and_tokens(self, data: dict) -> tuple[str, list[str]]:
        return data["sentences"][0], list(data.get("tokens", [[]])[0])


class MegatronClient(_RestClient):
    server_type = "megatron"

    def build_request(self, prompt: Any, p: Params, stream: bool = False) -> tuple[str, str, dict]:
        if p.repetition_penalty != 1.0:
            raise ServegenError("server_type megatron: repetition_penalty is not supported")
        if p.temperature == 0:
            temperature, top_k, top_p = 1.0, 1, 0.0  # greedy
        else:
            temperature, top_k, top_p = p.temperature, p.top_k, (p.top_p if p.top_p < 1.0 else 0.0)
            if top_k and top_p:
                raise ServegenError("server_type megatron cannot use top_k and top_p together; set one of them")
        body = {
            "prompts": [prompt],
            "tokens_to_generate": p.tokens_to_generate,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "add_BOS": False,
            "logprobs": False,
        }
        if p.random_seed is not None:
            if p.random_seed < 0:
                raise ServegenError("server_type megatron: random_seed must be >= 0")
            body["random_seed"] = p.random_seed
        if p.extra_body:
            body.update(p.extra_body)
        return "PUT", "/api", body

    def full_text_and_tokens(self, data: dict) -> tuple[str, list[str]]:
        return data["text"][0], list(data.get("segments", [[]])[0])


def _tokens_after(tokens: list[str], chars: int) -> int:
    """How many tokens start at or after `chars` characters of their concatenation."""
    offset = 0
    for i, token in enumerate(tokens):
        if offset >= chars:
            return len(tokens) - i
        offset += len(token)
    return 0
