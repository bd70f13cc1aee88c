"""The vllm client against the REAL vLLM CPU server on servegen's demo model (a tiny Llama 3
format model trained to answer "What's A + B?" with "A + B = C."), started once per test
session by the `vllm_server` fixture (tests/conftest.py)."""

import asyncio
import json

import pydantic
import pytest

from servegen.demo_model.data import expected_json_reply, format_question, held_out_pairs
from servegen.inference import ContextLengthError, Runner, get_model
from servegen.prompt import get_prompt

pytestmark = pytest.mark.vllm

RAW = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CHAT = [{"role": "user", "content": "What's 2 + 2?"}]
BOUNDED = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 200}},
    "required": ["answer"],
    "additionalProperties": False,
}


class Answer(pydantic.BaseModel):
    answer: int = pydantic.Field(ge=0, le=200)


def raw(a: int, b: int) -> str:
    return RAW.replace("2 + 2", f"{a} + {b}")


@pytest.fixture(scope="module")
def llm(vllm_server):
    with get_model("vllm", base_url=vllm_server.base_url, max_concurrent_requests=64) as client:  # model: discovered
        yield client


def test_raw_string_and_chat_prompts(llm, vllm_server):
    rows = llm.generate([RAW, CHAT], tokens_to_generate=20)
    assert llm.model == vllm_server.model
    assert [r["generation"] for r in rows] == ["2 + 2 = 4.", "2 + 2 = 4."]
    assert [r["finish_reason"] for r in rows] == ["stop", "stop"]
    assert all(0 < r["num_generated_tokens"] < 20 for r in rows)


def test_prompt_system_string_is_what_the_model_expects(llm):
    prompt = get_prompt("generic/default", "llama3-instruct")
    text = prompt.build_string({"question": "What's 2 + 2?"})
    assert text == RAW
    row = llm.generate([text], stop_phrases=prompt.stop_phrases, tokens_to_generate=20)[0]
    assert row["generation"] == "2 + 2 = 4."


def test_many_additions_at_once(llm):
    pairs = [(a, b) for a in range(0, 100, 7) for b in range(3, 100, 11)]
    rows = llm.generate([raw(a, b) for a, b in pairs], tokens_to_generate=20)
    answers = [r["generation"] for r in rows]
    expected = [f"{a} + {b} = {a + b}." for a, b in pairs]
    correct = sum(x == y for x, y in zip(answers, expected))
    assert correct >= 0.95 * len(pairs), list(zip(answers, expected))


def test_streaming_joins_to_the_generation(llm):
    raw_pieces = list(llm.stream(RAW, tokens_to_generate=20))
    chat_pieces = list(llm.stream(CHAT, tokens_to_generate=20))
    assert len(raw_pieces) > 1 and "".join(raw_pieces) == "2 + 2 = 4."
    assert "".join(chat_pieces) == "2 + 2 = 4."

    async def on_my_loop():
        async with get_model("vllm", base_url=llm.base_url, model=llm.model) as client:
            return [p async for p in client.stream_async(CHAT, stop_phrases=" =")]

    assert "".join(asyncio.run(on_my_loop())) == "2 + 2"


def test_stop_phrases(llm):
    removed, kept = llm.generate([RAW, CHAT], stop_phrases=" =", remove_stop_phrases=[True, False])
    assert (removed["generation"], removed["finish_reason"]) == ("2 + 2", "stop")
    assert (kept["generation"], kept["finish_reason"]) == ("2 + 2 =", "stop")


def test_typed_outputs_are_the_answers(llm):
    """The demo model answers {"answer":N} once the server has begun its reply with "{": typed
    outputs hold the sums, held-out pairs included, through both endpoints, and the output is the
    generation parsed."""
    pairs = [(2, 2), *held_out_pairs()[:30]]
    prompts = [raw(a, b) for a, b in pairs] + [[{"role": "user", "content": format_question(a, b, 1)}] for a, b in pairs]
    expected = [{"answer": a + b} for a, b in pairs] * 2
    rows = llm.generate(prompts, output_type={"answer": "int"}, tokens_to_generate=12)
    assert [r["output"] for r in rows] == expected
    assert all(json.loads(r["generation"]) == r["output"] for r in rows)
    assert rows[0]["generation"] == expected_json_reply(2, 2) == '{"answer":4}'
    schema_rows = llm.generate([RAW, CHAT, CHAT], json_schema=[BOUNDED, BOUNDED, Answer], tokens_to_generate=12)
    assert [r["output"] for r in schema_rows] == [{"answer": 4}, {"answer": 4}, Answer(answer=4)]


def test_the_server_applies_the_schema_where_the_model_would_answer_otherwise(llm):
    """2 + 2 would be 4: a schema that allows only 7, or only numbers from 150 up, gives what the
    schema allows, so the server did constrain the decoding to it (the client alone would retry
    and then fail: the model never answers 7 unasked)."""
    only_7 = {**BOUNDED, "properties": {"answer": {"type": "integer", "enum": [7]}}}
    at_least_150 = {**BOUNDED, "properties": {"answer": {"type": "integer", "minimum": 150, "maximum": 999}}}
    seven, big = llm.generate([RAW, CHAT], json_schema=[only_7, at_least_150], tokens_to_generate=12)
    assert seven["output"] == {"answer": 7} and seven["generation"] == '{"answer":7}'
    assert 150 <= big["output"]["answer"] <= 999 and json.loads(big["generation"]) == big["output"]
    flag = llm.generate([CHAT], output_type={"correct": "bool"}, tokens_to_generate=30)[0]
    assert json.loads(flag["generation"]) == flag["output"] and isinstance(flag["output"]["correct"], bool)


def test_a_typed_row_that_fails_counts_the_tokens_it_generated(llm):
    """Cut at 3 tokens, '{"answer' never validates: with soft_fail the row has no output, an
    error, and the 3 tokens the last attempt generated."""
    row = llm.generate([RAW], output_type={"answer": "int"}, tokens_to_generate=3, soft_fail=True)[0]
    assert row["output"] is None and "not a valid typed output after 3 attempts" in row["error"]
    assert (row["generation"], row["num_generated_tokens"], row["finish_reason"]) == ('{"answer', 3, "error")


def test_per_prompt_lists(llm):
    rows = llm.generate([raw(2, 3), raw(10, 20)], tokens_to_generate=[20, 3], temperature=[0.0, 0.0])
    assert rows[0]["generation"] == "2 + 3 = 5."
    assert (rows[1]["finish_reason"], rows[1]["num_generated_tokens"]) == ("length", 3)
    assert "10 + 20 = 30.".startswith(rows[1]["generation"])


def test_random_seed_reproducible_at_temperature_1(llm):
    prompts = [raw(41, 37)] * 6
    seeds = [1, 1, 2, 2, 3, 3]
    rows = llm.generate(prompts, temperature=1.0, top_k=50, random_seed=seeds, tokens_to_generate=12)
    texts = [r["generation"] for r in rows]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[4] == texts[5]
    again = llm.generate(prompts[:2], temperature=1.0, top_k=50, random_seed=[2, 3], tokens_to_generate=12)
    assert [r["generation"] for r in again] == [texts[2], texts[4]]


def test_logprobs(llm):
    row = llm.generate([RAW], top_logprobs=2, tokens_to_generate=20)[0]
    assert len(row["tokens"]) == len(row["logprobs"]) == len(row["top_logprobs"]) == row["num_generated_tokens"]
    assert all(lp <= 0 for lp in row["logprobs"]) and all(len(top) <= 2 for top in row["top_logprobs"])
    chat = llm.generate([CHAT], top_logprobs=0, tokens_to_generate=20)[0]
    assert "".join(chat["tokens"]).startswith("2 + 2 = 4.")


def test_greedy_logprobs_pick_the_top_alternative_and_join_to_the_generation(llm):
    """temperature 0: each chosen token is the most likely one, so its logprob is the highest among
    its top-k alternatives; the tokens joined are the generation (plus the stop token <|eot_id|>,
    which the server lists last when it ends the generation)."""
    prompts = [raw(2, 2), raw(41, 37), raw(7, 95), CHAT]
    rows = llm.generate(prompts, temperature=0.0, top_logprobs=3, tokens_to_generate=[20, 20, 5, 20])
    assert [r["finish_reason"] for r in rows] == ["stop", "stop", "length", "stop"]
    for row in rows:
        assert len(row["tokens"]) == len(row["logprobs"]) == len(row["top_logprobs"]) == row["num_generated_tokens"]
        for token, logprob, top in zip(row["tokens"], row["logprobs"], row["top_logprobs"]):
            assert 1 <= len(top) <= 4  # k, and the chosen token if it were not among them
            assert logprob == pytest.approx(max(top.values()), abs=1e-4), (row["generation"], token, top)
        tokens = row["tokens"][:-1] if row["finish_reason"] == "stop" else row["tokens"]
        assert row["finish_reason"] == "length" or row["tokens"][-1] == "<|eot_id|>"
        assert "".join(tokens) == row["generation"]
    assert [r["generation"] for r in rows] == ["2 + 2 = 4.", "41 + 37 = 78.", "7 + 95", "2 + 2 = 4."]


def test_context_length_overflow_is_a_clear_error(llm):
    too_long = RAW + "1 + 1 " * 400
    with pytest.raises(ContextLengthError, match=r"prompt 0: vllm server rejected the request: HTTP 400"):
        llm.generate([too_long], tokens_to_generate=20)
    row = llm.generate([too_long, RAW], tokens_to_generate=20, soft_fail=True)
    assert row[0]["finish_reason"] == "error" and "HTTP 400" in row[0]["error"]
    assert row[1]["generation"] == "2 + 2 = 4."


def test_several_prompts_per_request_give_the_same_rows_as_one_per_request(vllm_server):
    """vLLM's default (16 string prompts per request, each choice's token ids counted) against one
    prompt per request: the same generations, token counts and finish reasons, greedy and seeded,
    with stop phrases, typed outputs, logprobs and a prompt over the context length among them."""
    prompts = [raw(a, b) for a in range(0, 100, 9) for b in range(1, 100, 13)]  # 12 x 8 = 96
    prompts[37] = RAW + "1 + 1 " * 400  # over max_model_len: a 400 for its request of 16
    calls = [
        dict(tokens_to_generate=20),
        dict(tokens_to_generate=5),  # some stop at the length
        dict(tokens_to_generate=12, temperature=1.0, top_k=50, random_seed=11),
        dict(tokens_to_generate=20, stop_phrases=" =", remove_stop_phrases=False),
        dict(tokens_to_generate=20, top_logprobs=1),
        dict(tokens_to_generate=30, json_schema=BOUNDED),
    ]
    base = vllm_server.base_url
    with get_model("vllm", base_url=base, prompts_per_request=1, soft_fail=True) as single, \
            get_model("vllm", base_url=base, soft_fail=True) as batched:
        assert batched.prompts_per_request == 16
        for params in calls:
            one = single.generate(prompts, **params)
            several = batched.generate(prompts, **params)
            assert several == one, params
            assert "maximum context length" in several[37]["error"]
            assert all(r["num_generated_tokens"] > 0 for i, r in enumerate(several) if i != 37)


def test_runner(vllm_server):
    with Runner(server_type="vllm", base_url=vllm_server.base_url, template="llama3-instruct") as runner:
        assert runner.call("What's 2 + 2?", tokens_to_generate=20) == "2 + 2 = 4."
        assert runner.call(["What's 3 + 4?", "What's 10 + 5?"], tokens_to_generate=20) == ["3 + 4 = 7.", "10 + 5 = 15."]
    with Runner(server_type="vllm", base_url=vllm_server.base_url) as runner:  # chat, no template
        assert runner.call("What's 2 + 2?", tokens_to_generate=20) == "2 + 2 = 4."
        assert runner.call("What's 2 + 2?", output_type={"answer": "int"}) == {"answer": 4}  # as docs/clients.md
        assert runner.call("What's 2 + 2?", json_schema=Answer, tokens_to_generate=30) == Answer(answer=4)
