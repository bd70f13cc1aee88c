"""Servers that speak the OpenAI protocol (/v1/completions, /v1/chat/completions, /v1/models),
each with its own extras. What each one is sent, per parameter:

| parameter | openai | vllm | sglang | trtllm | hf (transformers serve) | megatron_openai |
| --- | --- | --- | --- | --- | --- | --- |
| top_k (off) | sent only if set | top_k (-1) | top_k (-1) | top_k (0) | generation_config.top_k (0) when sampling | top_k (0) |
| top_p (off) | top_p (1.0) | top_p (1.0) | top_p (1.0) | top_p (1.0) | top_p (1.0) | top_p (0.0) (****) |
| min_p | sent only if set | min_p | min_p | min_p | generation_config.min_p if set | refused |
| repetition_penalty | sent only if set | repetition_penalty | repetition_penalty | repetition_penalty | generation_config if set | refused |
| random_seed | seed | seed | seed | seed | seed | seed (>= 0) |
| stop_phrases | stop (first 4) | stop (first 4: VLLM_MAX_STOP_STRINGS) | stop | stop | stop | stop |
| remove_stop_phrases=False | - | include_stop_str_in_output | no_stop_trim | include_stop_str_in_output | - | no stop (****) |
| typed output, chat | response_format json_schema | response_format json_schema | response_format json_schema | response_format json (*) | - | - |
| typed output, completions | - | structured_outputs.json | json_schema (a string) | response_format json (*) | - | - |
| string prompts | - | add_special_tokens=false | (**) | add_special_tokens=false | (**) | (**) |
| several string prompts per request | - | prompt: [...], return_token_ids | prompt: [...], return_token_ids (***) | - | - | prompt: [...] (***) |
| model | model | model | model | model | model | - (****) |

"-": not sent; typed outputs are then validated and retried on the client only. Every server type
validates typed outputs on the client, constrained or not.
(*) only with get_model(..., structured_decoding=True): trtllm-serve constrains output only
when it was started with a guided decoding backend.
(**) SGLang, transformers serve and Megatron-LM have no switch: they tokenize a string prompt
with the tokenizer's defaults, so with a tokenizer that adds BOS, a prompt that already starts
with BOS gets two (Megatron-LM: unless started with --tokenizer-hf-no-include-special-tokens).
vLLM and trtllm-serve add special tokens only when told to (add_special_tokens, default true),
which we turn off: the string is the exact model input. (Even told to, vLLM adds a BOS only if
the tokenizer's post-processor does, as Llama 3's does.)
extra_body={"add_special_tokens": True} turns it back on.
(***) prompts_per_request > 1 (vLLM's default, SGLang's choice): the completions `prompt` field
takes a list of strings and the server answers one choice per prompt, in order (`index`). The
usage counts are the request's, so each prompt's num_generated_tokens is the length of its
choice's `token_ids`, which `return_token_ids: true` asks for (vLLM >= 0.10.2; SGLang only
since 2026, PR 30917, hence not its default); a server that leaves them out is an error, not a
guess. Megatron-LM returns each choice's `generation_token_ids` unasked (opt-in, not its
default: it samples prompt i of a request with seed + i, so a seeded prompt's generation would
depend on its place in the batch). trtllm-serve takes a list too but returns per-choice token
ids only without text (detokenize=false), the hosted OpenAI API not at all, and transformers
serve takes one string: one prompt per request for them.
(****) Megatron-LM (launch_inference_server.py): its sampler takes top_p 0.0 as off (1.0 still
runs the top-p filter), and its default torch sampler asserts when top_k and top_p are both on,
so top_k with top_p < 1 is refused when sampling; top_k, top_p and temperature are always sent,
since a field left out takes the model's generation_config.json value. It matches a stop phrase
on its tokens and cuts it off the text, with no field to keep it: with remove_stop_phrases=False
no stop is sent and the client cuts the text after the phrase (the server generates on to
tokens_to_generate). It serves one model, has no /v1/models and ignores a model field (it
answers "EMPTY"): no model is sent, and model= is not needed.
transformers serve rejects fields it does not know (ignore_eos, top_k, ...), so its extras go
in its own `generation_config` field, a JSON string, sent only for sampling (temperature > 0:
do_sample, which temperature alone does not switch on for a model whose generation_config lacks
it, and top_k, else its default 50) or for min_p / repetition_penalty.
"""

import json
from typing import Any

from servegen.errors import ServegenError
from servegen.inference.client import Client
from servegen.inference.errors import BatchingUnsupported
from servegen.inference.params import Params

OPENAI_MAX_STOP = 4  # the hosted API's limit; the rest are trimmed on the client
VLLM_MAX_STOP = 4  # vLLM's VLLM_MAX_STOP_STRINGS default: HTTP 400 for a fifth; trimmed on the client too


class OpenAIClient(Client):
    """Any OpenAI-compatible API (api.openai.com, NVIDIA NIM, ...): only standard fields unless
    a parameter is set away from its default."""

    server_type = "openai"
    unbatched_because = "the OpenAI API returns no per-prompt token counts for several prompts"
    top_k_off = -1
    constrains_chat = True  # response_format json_schema on chat
    max_stop: int | None = OPENAI_MAX_STOP
    sends_add_special_tokens = False  # True: add_special_tokens=false with string prompts (no second BOS)
    sends_model = True
    token_ids_field = "token_ids"  # each choice's generated token ids, in a request of several prompts

    def check_prompt(self, prompt: Any, p: Params) -> None:
        if isinstance(prompt, str):
            return
        if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
            raise ServegenError(
                f"a prompt must be a string or a list of chat messages ({{'role': ..., 'content': ...}}), got {_short(prompt)}"
            )

    def build_request(self, prompt: Any, p: Params, stream: bool = False) -> tuple[str, str, dict]:
        chat = not isinstance(prompt, str)
        body = {"model": self.model} if self.sends_model else {}
        if chat:
            path, body["messages"] = "/v1/chat/completions", prompt
        else:
            path, body["prompt"] = "/v1/completions", prompt
            if self.sends_add_special_tokens:
                body["add_special_tokens"] = False
        body["max_tokens"] = p.tokens_to_generate
        body["temperature"] = p.temperature
        body["top_p"] = p.top_p
        self.add_sampling(body, p)
        if p.random_seed is not None:
            body["seed"] = p.random_seed
        if p.stop_phrases:
            body["stop"] = list(p.stop_phrases[: self.max_stop])
            if not p.remove_stop_phrases:
                self.add_keep_stop(body)
        if p.top_logprobs is not None:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = p.top_logprobs
            else:
                body["logprobs"] = p.top_logprobs
        if p.spec is not None:
            self.add_structured(body, p, chat)
        if stream:
            body["stream"] = True
        if p.extra_body:
            body.update(p.extra_body)
        return "POST", path, body

    def add_sampling(self, body: dict, p: Params) -> None:
        if p.top_k:
            body["top_k"] = p.top_k
        if p.min_p:
            body["min_p"] = p.min_p
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty

    def add_keep_stop(self, body: dict) -> None:
        """Ask the server to keep the stop phrase in the text (remove_stop_phrases=False)."""

    def add_structured(self, body: dict, p: Params, chat: bool) -> None:
        if chat and self.constrains_chat:
            body["response_format"] = _response_format(p)

    def build_batch_request(self, prompts: list[str], p: Params) -> tuple[str, str, dict]:
        method, path, body = self.build_request(prompts[0], p)
        body["prompt"] = list(prompts)
        body.setdefault("return_token_ids", True)  # each choice's token ids: the usage is the request's
        return method, path, body

    def parse_batch_response(self, data: Any, prompts: list[str], p: Params) -> list[dict]:
        choices = data["choices"]
        if len(choices) != len(prompts):
            raise ValueError(f"{len(choices)} choices for {len(prompts)} prompts")
        rows: list = [None] * len(prompts)
        for choice in choices:
            token_ids = choice.get(self.token_ids_field)
            if token_ids is None:
                raise BatchingUnsupported(
                    f"the {self.server_type} server answered {len(prompts)} prompts in one request without each "
                    f"choice's {self.token_ids_field}, so num_generated_tokens cannot be counted (return_token_ids needs vLLM "
                    ">= 0.10.2, or an SGLang from 2026 on); pass prompts_per_request=1"
                )
            row = {"generation": choice["text"], "num_generated_tokens": len(token_ids),
                   "finish_reason": choice.get("finish_reason")}
            if p.top_logprobs is not None:
                _add_logprobs(row, choice.get("logprobs"), False, p.top_logprobs)
            rows[choice["index"]] = row
        if any(row is None for row in rows):
            raise ValueError(f"choice indexes {sorted(c['index'] for c in choices)} for {len(prompts)} prompts")
        return rows

    def parse_response(self, data: Any, prompt: Any, p: Params) -> dict:
        choice = data["choices"][0]
        chat = not isinstance(prompt, str)
        text = (choice["message"]["content"] or "") if chat else choice["text"]
        usage = data.get("usage") or {}
        row = {
            "generation": text,
            "num_generated_tokens": usage.get("completion_tokens"),
            "finish_reason": choice.get("finish_reason"),
        }
        if p.top_logprobs is not None:
            _add_logprobs(row, choice.get("logprobs"), chat, p.top_logprobs)
            if row["num_generated_tokens"] is None:
                row["num_generated_tokens"] = len(row["tokens"])
        return row

    def parse_stream_event(self, event: dict) -> str:
        choices = event.get("choices") or ()
        if not choices:
            return ""  # e.g. the usage chunk
        choice = choices[0]
        if "delta" in choice:
            return choice["delta"].get("content") or ""
        return choice.get("text") or ""


class VLLMClient(OpenAIClient):
    server_type = "vllm"
    unbatched_because = None
    default_prompts_per_request = 16  # measured: docs/clients.md#several-prompts-per-request
    max_stop = VLLM_MAX_STOP
    sends_add_special_tokens = True

    def add_sampling(self, body: dict, p: Params) -> None:
        # always explicit: vLLM otherwise applies the model's generation_config.json defaults
        body["top_k"] = p.top_k or self.top_k_off
        body["min_p"] = p.min_p
        body["repetition_penalty"] = p.repetition_penalty

    def add_keep_stop(self, body: dict) -> None:
        body["include_stop_str_in_output"] = True

    def add_structured(self, body: dict, p: Params, chat: bool) -> None:
        if chat:
            body["response_format"] = _response_format(p)
        else:
            # not guided_json: vLLM ignores it silently (docs/clients.md)
            body["structured_outputs"] = {"json": p.spec.schema}


class SGLangClient(VLLMClient):
    server_type = "sglang"
    default_prompts_per_request = 1  # per-choice token ids only in SGLang releases since 2026
    sends_add_special_tokens = False
    max_stop = None

    def add_keep_stop(self, body: dict) -> None:
        body["no_stop_trim"] = True

    def add_structured(self, body: dict, p: Params, chat: bool) -> None:
        if chat:
            body["response_format"] = _response_format(p)
        else:
            body["json_schema"] = json.dumps(p.spec.schema)


class TRTLLMClient(VLLMClient):
    server_type = "trtllm"
    unbatched_because = "trtllm-serve returns per-prompt token ids only without the text (detokenize=false)"
    default_prompts_per_request = 1
    top_k_off = 0
    max_stop = None

    def __init__(self, *args, structured_decoding: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.structured_decoding = structured_decoding

    def add_structured(self, body: dict, p: Params, chat: bool) -> None:
        if self.structured_decoding:
            body["response_format"] = {"type": "json", "schema": p.spec.schema}


class HFClient(OpenAIClient):
    """`transformers serve`: strict about fields, no logprobs, no structured output, and its
    /v1/models can fail (then pass model=)."""

    server_type = "hf"
    unbatched_because = "transformers serve takes one string prompt per request"
    max_stop = None
    constrains_chat = False

    def check_prompt(self, prompt: Any, p: Params) -> None:
        super().check_prompt(prompt, p)
        if p.top_logprobs is not None:
            raise ServegenError("transformers serve (server_type hf) returns no logprobs; drop top_logprobs")

    def add_sampling(self, body: dict, p: Params) -> None:
        # only when needed: the server builds a GenerationConfig from this field alone, without
        # the model's eos_token_id, and with --continuous-batching such a request may then run
        # on past the end of sequence to tokens_to_generate (docs/clients.md)
        config: dict[str, Any] = {"do_sample": True, "top_k": p.top_k} if p.temperature > 0 else {}
        if p.min_p:
            config["min_p"] = p.min_p
        if p.repetition_penalty != 1.0:
            config["repetition_penalty"] = p.repetition_penalty
        if config:
            body["generation_config"] = json.dumps(config)


class MegatronOpenAIClient(OpenAIClient):
    """Megatron-LM's launch_inference_server.py: no model name, top_k or top_p (0.0: off), no
    min_p, repetition_penalty or structured output, stop phrases cut off by the server; several
    string prompts per request when asked (each choice's generation_token_ids come unasked)."""

    server_type = "megatron_openai"
    discovers_model = False  # no /v1/models
    sends_model = False  # it ignores the field
    unbatched_because = None
    default_prompts_per_request = 1  # it samples prompt i of a request with seed + i
    max_stop = None
    constrains_chat = False  # its chat endpoint has no response_format
    token_ids_field = "generation_token_ids"

    def check_prompt(self, prompt: Any, p: Params) -> None:
        super().check_prompt(prompt, p)
        if p.min_p:
            raise ServegenError("server_type megatron_openai: min_p is not supported")
        if p.repetition_penalty != 1.0:
            raise ServegenError("server_type megatron_openai: repetition_penalty is not supported")
        if p.temperature > 0 and p.top_k and p.top_p < 1.0:
            raise ServegenError("server_type megatron_openai cannot use top_k and top_p together; set one of them")
        if p.random_seed is not None and p.random_seed < 0:
            raise ServegenError("server_type megatron_openai: random_seed must be >= 0")

    def add_sampling(self, body: dict, p: Params) -> None:
        # always explicit: the server otherwise takes the model's generation_config.json values
        body["top_k"] = p.top_k
        body["top_p"] = p.top_p if p.top_p < 1.0 else 0.0  # 0.0 is off; 1.0 still filters, and asserts with top_k

    def add_keep_stop(self, body: dict) -> None:
        # the engine cuts a stop phrase off the text and no field keeps it: the client alone cuts, after it
        del body["stop"]

    def build_batch_request(self, prompts: list[str], p: Params) -> tuple[str, str, dict]:
        method, path, body = self.build_request(prompts[0], p)
        body["prompt"] = list(prompts)
        return method, path, body


def _response_format(p: Params) -> dict:
    return {"type": "json_schema", "json_schema": {"name": p.spec.name, "schema": p.spec.schema}}


def _add_logprobs(row: dict, logprobs: Any, chat: bool, k: int) -> None:
    """tokens, logprobs (of the chosen tokens) and, for k > 0, top_logprobs ({token: logprob} per
    position), from either endpoint's format."""
    if chat:
        content = (logprobs or {}).get("content") or []
        row["tokens"] = [t["token"] for t in content]
        row["logprobs"] = [t["logprob"] for t in content]
        if k:
            row["top_logprobs"] = [{c["token"]: c["logprob"] for c in t.get("top_logprobs") or ()} for t in content]
    else:
        logprobs = logprobs or {}
        row["tokens"] = list(logprobs.get("tokens") or [])
        row["logprobs"] = list(logprobs.get("token_logprobs") or [])
        top = list(logprobs.get("top_logprobs") or [])
        # Megatron-LM puts a None first (the first prompt token's, as with echo) even without echo
        if len(row["logprobs"]) == len(row["tokens"]) + 1 and row["logprobs"][0] is None:
            del row["logprobs"][0], top[:1]
        if k:
            row["top_logprobs"] = [dict(t or {}) for t in top]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
