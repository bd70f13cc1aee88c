"""What each server type is sent for each parameter: golden request bodies, one file per server
type (regenerate with SERVEGEN_UPDATE_GOLDEN=1 and review the diff)."""

import json

import pytest

from servegen.errors import ServegenError
from servegen.inference import CLIENTS, get_model
from servegen.inference.params import Plan

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2 + 2?"}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 200}},
    "required": ["answer"],
    "additionalProperties": False,
}
CASES = [
    ("completion, defaults", "<|begin_of_text|>Hi", {}),
    ("chat, defaults", MESSAGES, {}),
    (
        "completion, every sampling parameter set",
        "Hi",
        dict(tokens_to_generate=32, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, random_seed=7),
    ),
    ("completion, top_k 0 and top_p", "Hi", dict(temperature=0.7, top_p=0.9, top_k=0)),
    ("chat, five stop phrases kept", MESSAGES, dict(stop_phrases=["\n", "User:", "a", "b", "c"], remove_stop_phrases=False)),
    ("completion, stop phrases removed", "Hi", dict(stop_phrases=" =")),
    ("completion, top_logprobs 2", "Hi", dict(top_logprobs=2)),
    ("chat, top_logprobs 0", MESSAGES, dict(top_logprobs=0)),
    ("completion, output_type", "Hi", dict(output_type={"age": "int", "units": "str", "tags": "list[str]"})),
    ("chat, json_schema", MESSAGES, dict(json_schema=SCHEMA)),
    ("completion, extra_body", "Hi", dict(extra_body={"add_special_tokens": True, "min_tokens": 2})),
]


def built_requests(server_type: str, **kwargs):
    """(llm, case, prompt, params, (method, path, body) or the ServegenError) for each case."""
    llm = get_model(server_type, base_url="http://127.0.0.1:1", model="the-model", **kwargs)
    for name, prompt, params in CASES:
        p = Plan(None, params).shared
        try:
            llm.check_prompt(prompt, p)
            yield llm, name, prompt, p, llm.build_request(prompt, p)
        except ServegenError as e:
            yield llm, name, prompt, p, e


def bodies(server_type: str, **kwargs) -> list[dict]:
    out = []
    for _, name, _, _, built in built_requests(server_type, **kwargs):
        if isinstance(built, ServegenError):
            out.append({"case": name, "error": str(built)})
        else:
            method, path, body = built
            out.append({"case": name, "request": f"{method} {path}", "body": body})
    return out


@pytest.mark.parametrize("server_type", sorted(CLIENTS))
def test_request_bodies(server_type, golden):
    golden(f"bodies-{server_type}.json", json.dumps(bodies(server_type), indent=2) + "\n")


BATCH = ["<|begin_of_text|>What's 2 + 2?", "<|begin_of_text|>What's 3 + 3?"]
BATCH_CASES = [(name, params) for name, prompt, params in CASES if isinstance(prompt, str)]


@pytest.mark.parametrize("server_type", ["vllm", "sglang", "megatron_openai"])
def test_batched_request_bodies(server_type, golden):
    """Several string prompts in one request: the same fields as one prompt's request, the prompts
    as a list, and return_token_ids (each choice's token count) but for megatron_openai, which
    returns them unasked."""
    llm = get_model(server_type, base_url="http://127.0.0.1:1", model="the-model", prompts_per_request=16)
    out = []
    for name, params in BATCH_CASES:
        p = Plan(None, params).shared
        try:
            llm.check_prompt(BATCH[0], p)
        except ServegenError as e:
            out.append({"case": name, "error": str(e)})
            continue
        method, path, body = llm.build_batch_request(BATCH, p)
        single = llm.build_request(BATCH[0], p)[2]
        assert {k: v for k, v in body.items() if k not in ("prompt", "return_token_ids")} == {
            k: v for k, v in single.items() if k != "prompt"
        }
        out.append({"case": name, "request": f"{method} {path}", "body": body})
    golden(f"bodies-batched-{server_type}.json", json.dumps(out, indent=2) + "\n")


def test_trtllm_with_structured_decoding(golden):
    golden("bodies-trtllm-structured.json", json.dumps(bodies("trtllm", structured_decoding=True), indent=2) + "\n")


def test_streaming_adds_stream_true():
    llm = get_model("vllm", base_url="http://127.0.0.1:1", model="m")
    _, _, body = llm.build_request("Hi", Plan(None, {}).shared, stream=True)
    assert body["stream"] is True


def test_vllm_never_sends_guided_json():
    """vLLM silently ignores guided_json (200 OK, unconstrained): typed outputs must use
    structured_outputs / response_format."""
    for server_type in CLIENTS:
        for case in bodies(server_type):
            assert "guided_json" not in json.dumps(case)


def test_strings_go_to_completions_and_messages_to_chat():
    llm = get_model("sglang", base_url="http://127.0.0.1:1", model="m")
    p = Plan(None, {}).shared
    assert llm.build_request("x", p)[1] == "/v1/completions"
    assert llm.build_request(MESSAGES, p)[1] == "/v1/chat/completions"
    with pytest.raises(ServegenError, match="string or a list of chat messages"):
        llm.check_prompt([{"content": "no role"}], p)
