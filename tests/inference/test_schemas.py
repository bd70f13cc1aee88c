"""The stub's strict mode: each request body checked against the documented request schema of the
engine its client is for (tests/inference/schemas/<engine>.json, each saying which document and
version it was transcribed from). A misspelt field is an HTTP 400 naming it, as trtllm-serve and
the hosted OpenAI API answer one (vLLM and SGLang would drop it silently, NeMo log it and
Megatron-LM ignore it: the stub is stricter than they are, on purpose, so that a test fails where
a real server would quietly do something else); and every body servegen sends today, for each
server type and in each form (one prompt, several, chat, stream, typed output, logprobs), matches
its engine's schema, except for the documented rejections below."""

import json
import urllib.error
import urllib.request

import pytest
from stub_server import SCHEMA_DIR, SCHEMAS, SERVER_TYPE_HEADER, schema_problems
from test_request_bodies import BATCH, MESSAGES, built_requests

from servegen.errors import ServegenError
from servegen.inference import CLIENTS, RequestRejected, get_model

ENGINES = ["vllm", "sglang", "trtllm", "openai", "nemo", "megatron", "megatron_openai"]  # every server type but hf
STRING_ONLY = ("nemo", "megatron")


def test_each_schema_file_says_where_it_comes_from_and_is_a_valid_schema():
    files = sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))
    assert files == sorted(ENGINES) == sorted(SCHEMAS) == sorted(set(CLIENTS) - {"hf"})
    for engine in ENGINES:
        doc = json.loads((SCHEMA_DIR / f"{engine}.json").read_text())
        assert doc["engine"] == engine
        comment = " ".join(doc["$comment"])
        assert "Source:" in comment and ("commit" in comment or "0.32.0" in comment or "3.57.0" in comment)
        # every endpoint's schema takes no field it does not name (the point of strict mode)
        for route, name in doc["endpoints"].items():
            assert doc["$defs"][name]["additionalProperties"] is False, (engine, route)
    # load_schemas() checked each one with Draft202012Validator.check_schema


# --------------------------------------------------------------------- a misspelt field


MISSPELT = [
    (engine, kind, extra, field)
    for engine in ENGINES
    for kind in (("string",) if engine in STRING_ONLY else ("string", "chat"))
    for extra, field in [({"top_kk": 40}, "top_kk")]
] + [
    # vLLM itself drops these without a word (the unconstrained output guided_json gave)
    ("vllm", "string", {"guided_json": {"type": "object"}}, "guided_json"),
    ("vllm", "string", {"structured_outputs": {"jsn": {"type": "object"}}}, "jsn"),
    ("openai", "chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "shema": {}}}}, "shema"),
    ("sglang", "string", {"include_stop_str_in_output": True}, "include_stop_str_in_output"),  # vLLM's, not SGLang's
    ("trtllm", "string", {"no_stop_trim": True}, "no_stop_trim"),  # SGLang's, not trtllm-serve's
    ("nemo", "string", {"prompts": ["x"]}, "prompts"),  # Megatron-LM's, not NeMo's
    ("megatron", "string", {"end_strings": ["x"]}, "end_strings"),  # NeMo's, not Megatron-LM's
    # vLLM's; Megatron-LM's OpenAI server would ignore both without a word
    ("megatron_openai", "string", {"return_token_ids": True}, "return_token_ids"),
    ("megatron_openai", "chat", {"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("engine, kind, extra, field", MISSPELT, ids=[f"{e}-{k}-{f}" for e, k, _, f in MISSPELT])
def test_a_field_the_engine_does_not_document_is_a_400_naming_it(stub, engine, kind, extra, field):
    stub.expect_schema_errors = True
    prompt = "hi" if kind == "string" else [{"role": "user", "content": "hi"}]
    with get_model(engine, base_url=stub.base_url, max_retries=3, retry_backoff=0.001) as llm:
        with pytest.raises(RequestRejected, match=rf"HTTP 400 on /.*{engine}'s schema: .*'{field}'") as e:
            llm.generate([prompt], extra_body=extra)
        assert e.value.status == 400
        assert stub.requests["hi"] == 1 and not stub.answered  # a 4xx: not retried, not answered
        assert len(stub.schema_errors) == 1 and f"'{field}'" in stub.schema_errors[0]
        assert stub.headers[-1][SERVER_TYPE_HEADER] == engine
        # the rest of the body was fine: without the extra field it is answered
        assert llm.generate([prompt])[0]["generation"] == "reply to hi"
    assert len(stub.schema_errors) == 1


def test_strict_for_one_engine_and_off(stub):
    """Without servegen: strict = an engine checks every request against that engine's schema,
    answers in its error shape; strict = None reads only what it needs, as the stub always did."""
    stub.expect_schema_errors = True

    def send(method, path, body):
        request = urllib.request.Request(stub.base_url + path, json.dumps(body).encode(), method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    body = {"model": "m", "prompt": "p", "top_kk": 1}
    stub.strict = "sglang"
    status, answer = send("POST", "/v1/completions", body)
    assert status == 400 and answer["object"] == "error" and answer["code"] == 400
    assert answer["message"] == "the request does not match sglang's schema: body: unknown field 'top_kk'"
    assert send("POST", "/v1/completions", {"model": "m", "prompt": "p", "no_stop_trim": True})[0] == 200
    stub.strict = "trtllm"
    status, answer = send("POST", "/v1/completions", {"model": "m", "prompt": "p", "no_stop_trim": True})
    assert status == 400 and "unknown field 'no_stop_trim'" in answer["message"]
    stub.strict = "openai"
    status, answer = send("POST", "/v1/completions", body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error" and "'top_kk'" in answer["error"]["message"]
    stub.strict = "nemo"
    status, answer = send("PUT", "/generate", {"sentences": ["p"], "top_kk": 1, "temperature": 0})
    assert status == 400 and answer == ("the request does not match nemo's schema: body: unknown field 'top_kk'; "
                                        "body.temperature: 0 is less than or equal to the minimum of 0")
    stub.strict = "auto"  # a request that does not say its server type is refused, not let through
    status, answer = send("POST", "/v1/completions", {"model": "m", "prompt": "p"})
    assert status == 400 and SERVER_TYPE_HEADER in answer["error"]["message"]
    assert len(stub.schema_errors) == 5
    stub.strict = None
    status, answer = send("POST", "/v1/completions", body)
    assert status == 200 and answer["choices"][0]["text"] == "reply to p"
    assert len(stub.schema_errors) == 5


# --------------------------------------------------------------------- what servegen sends


def sent_bodies(engine: str, **kwargs) -> list[tuple[str, str, dict]]:
    """(case, "METHOD /path", body) of every request body the golden cases make, as one request,
    streamed, and (server types that batch) several prompts in one request."""
    out = []
    for llm, name, prompt, p, built in built_requests(engine, **kwargs):
        if isinstance(built, ServegenError):
            continue  # what the server type cannot do (golden: an "error" case)
        method, path, body = built
        out.append((name, f"{method} {path}", body))
        if p.spec is None:  # typed outputs are not streamed
            method, path, body = llm.build_request(prompt, p, stream=True)
            out.append((name + ", streamed", f"{method} {path}", body))
        if llm.unbatched_because is None and isinstance(prompt, str):
            method, path, body = llm.build_batch_request(BATCH, p)
            out.append((name + ", batched", f"{method} {path}", body))
    return out


# what an engine's schema refuses, by design: fields the caller asked for that the engine has not
# (the server's 400 names them: servegen does not drop a parameter the caller set)
REFUSED = {
    # the hosted API has no top_k / min_p / repetition_penalty: sent only when set (docs/clients.md)
    ("openai", "completion, every sampling parameter set"): "body: unknown fields 'min_p', 'repetition_penalty', 'top_k'",
    # extra_body={"add_special_tokens": True, "min_tokens": 2}, the caller's own fields
    ("openai", "completion, extra_body"): "body: unknown fields 'add_special_tokens', 'min_tokens'",
    ("sglang", "completion, extra_body"): "body: unknown field 'add_special_tokens'",
    ("nemo", "completion, extra_body"): "body: unknown fields 'add_special_tokens', 'min_tokens'",
    ("megatron", "completion, extra_body"): "body: unknown fields 'add_special_tokens', 'min_tokens'",
    ("megatron_openai", "completion, extra_body"): "body: unknown fields 'add_special_tokens', 'min_tokens'",
}


@pytest.mark.parametrize("engine", ENGINES + ["trtllm-structured"])
def test_every_body_servegen_sends_matches_its_engine_schema(engine):
    kwargs = {"structured_decoding": True} if engine == "trtllm-structured" else {}
    engine = engine.removesuffix("-structured")
    seen = set()
    for case, route, body in sent_bodies(engine, **kwargs):
        problems = "; ".join(schema_problems(engine, route, body))
        seen.add((engine, _base(case)))
        assert problems == REFUSED.get((engine, _base(case)), ""), (case, route, body)
    assert {k for k in REFUSED if k[0] == engine} <= seen


def _base(case: str) -> str:
    return case.removesuffix(", streamed").removesuffix(", batched")


def test_vllm_is_sent_at_most_4_stop_strings_and_the_client_trims_at_the_rest(stub):
    """vLLM 0.32 answers HTTP 400 to a fifth stop string (VLLM_MAX_STOP_STRINGS, default 4): the
    first 4 are sent, and the client trims at every phrase itself."""
    stub.replies["hi"] = "one <5> two"
    with get_model("vllm", base_url=stub.base_url) as llm:
        phrases = ["<1>", "<2>", "<3>", "<4>", "<5>"]
        row = llm.generate(["hi"], stop_phrases=phrases)[0]
        assert (row["generation"], row["finish_reason"]) == ("one ", "stop")
    assert stub.bodies[-1]["stop"] == phrases[:4]
    assert stub.schema_errors == []


# --------------------------------------------------------------------- the same, through the stub


@pytest.mark.parametrize("engine", ENGINES)
def test_what_each_client_sends_passes_the_strict_stub(stub, engine):
    """Every kind of call, sent for real to the stub in strict mode: each body validated against
    its engine's schema (counted), none refused (the fixture fails a test that had one)."""
    kwargs = {"structured_decoding": True} if engine == "trtllm" else {}
    chat = [*MESSAGES[:1], {"role": "user", "content": "c"}]
    stub.replies.update({"t": '{"age": 3}', "c2": '{"answer": 4}'})
    sampling = dict(temperature=0.7, top_p=0.9, random_seed=7, tokens_to_generate=8)
    if engine not in ("openai", "megatron", "megatron_openai"):  # (the hosted API has neither; Megatron-LM: top_p or top_k)
        sampling.update(top_k=40, repetition_penalty=1.1)
    if engine not in ("openai", "megatron_openai", *STRING_ONLY):
        sampling.update(min_p=0.05)
    with get_model(engine, base_url=stub.base_url, **kwargs) as llm:
        assert llm.generate(["a"])[0]["generation"] == "reply to a"
        assert llm.generate(["b"], **sampling)[0]["generation"] == "reply to b"
        llm.generate(["k"], stop_phrases=["x", "y", "z", "to"], remove_stop_phrases=False)
        assert llm.generate(["t"], output_type={"age": "int"})[0]["output"] == {"age": 3}
        assert "".join(llm.stream("s")) == "reply to s"
        if engine not in STRING_ONLY:
            assert llm.generate([chat], **sampling)[0]["generation"] == "reply to c"
            assert llm.generate(["l"], top_logprobs=2)[0]["tokens"] == ["reply", "to", "l"]
            assert llm.generate([chat], top_logprobs=0)[0]["tokens"] == ["reply", "to", "c"]
            chat2 = [{"role": "user", "content": "c2"}]
            assert llm.generate([chat2], json_schema={"type": "object", "title": "An answer"})[0]["output"] == {"answer": 4}
            assert "".join(llm.stream(chat)) == "reply to c"
    requests = len(stub.bodies)
    if CLIENTS[engine].unbatched_because is None:
        with get_model(engine, base_url=stub.base_url, prompts_per_request=4) as llm:
            rows = llm.generate([f"p{i}" for i in range(6)], **sampling)
            assert [r["generation"] for r in rows] == [f"reply to p{i}" for i in range(6)]
            assert llm.generate(["q0", "q1"], top_logprobs=1, output_type={"age": "int"}, soft_fail=True)
        assert sorted(stub.batch_sizes[requests:requests + 2]) == [2, 4]
    assert stub.validated == {engine: len(stub.bodies)} and len(stub.bodies) >= 5
    assert {h[SERVER_TYPE_HEADER] for h in stub.headers} == {engine}
    assert stub.schema_errors == []
