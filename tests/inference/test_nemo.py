"""The NeMo and Megatron-LM clients against the stub's copy of their REST shapes (the real
servers need GPUs: see servegen/inference/nemo.py): the prompt cut off the returned text,
token counts, finish reasons, stop phrases on the client, refusals sent as 200s, typed outputs
validated and retried, emulated streaming."""

import pytest

from servegen.errors import ServegenError
from servegen.inference import InvalidOutput, RequestRejected, get_model

PROMPT = "<|begin_of_text|>Q: 2 + 2?\nA: "


@pytest.mark.parametrize("server_type", ["nemo", "megatron"])
def test_generation_is_the_text_after_the_prompt(stub, server_type):
    stub.replies[PROMPT] = "2 + 2 = 4. And then more words"  # the stub's tokens are words
    with get_model(server_type, base_url=stub.base_url) as llm:
        row = llm.generate([PROMPT], tokens_to_generate=5)[0]
        assert row == {"generation": "2 + 2 = 4.", "num_generated_tokens": 5, "finish_reason": "length"}
        row = llm.generate([PROMPT], stop_phrases=[" ="], tokens_to_generate=50)[0]
        assert (row["generation"], row["finish_reason"]) == ("2 + 2", "stop")
        assert "".join(llm.stream(PROMPT, stop_phrases=" =")) == "2 + 2"
    assert llm.model is None  # nothing to discover
    assert not any("v1/models" in str(b) for b in stub.bodies)


def test_nemo_end_string_ends_the_generation(stub):
    stub.replies[PROMPT] = "4.<|endoftext|> garbage"
    with get_model("nemo", base_url=stub.base_url) as llm:
        row = llm.generate([PROMPT])[0]
    assert (row["generation"], row["finish_reason"]) == ("4.", "stop")
    assert stub.bodies[-1]["end_strings"] == ["<|endoftext|>"] and stub.bodies[-1]["greedy"] is True


def test_megatron_refusal_sent_as_200_is_not_retried(stub):
    with get_model("megatron", base_url=stub.base_url) as llm:
        with pytest.raises(RequestRejected, match="megatron server rejected the request: top_p must be a positive float"):
            llm.generate([PROMPT], extra_body={"top_p": 1})  # an int where it wants a float
    assert stub.requests[PROMPT] == 1


@pytest.mark.parametrize("server_type", ["nemo", "megatron"])
def test_typed_output_validated_and_retried(stub, server_type):
    stub.replies[PROMPT] = ['{"answer": four}', '{"answer": 4}']
    with get_model(server_type, base_url=stub.base_url, max_output_retries=1) as llm:
        assert llm.generate([PROMPT], output_type={"answer": "int"})[0]["output"] == {"answer": 4}
        stub.replies[PROMPT] = "no"
        with pytest.raises(InvalidOutput):
            llm.generate([PROMPT], output_type={"answer": "int"})


@pytest.mark.parametrize("server_type", ["nemo", "megatron"])
def test_faults_are_retried(stub, server_type, client_timeouts):
    """Each prompt's first 3 requests meet a fault; a stall is cut by the 1 s timeout, about 10
    times the slowest of these 50 answers on a loaded machine (60 ms idle, 125 ms with the two
    cores busy). An answer slower still is asked again, so a prompt may count one answer more
    per timeout of its requests (the stalls never answer), and only that."""
    stub.mode, stub.fail_first = "mix", 3
    stub.fault_rate, stub.stall_s = 1.0, 60
    with get_model(server_type, base_url=stub.base_url, retry_backoff=0.001, timeout=1, max_retries=10) as llm:
        rows = llm.generate([f"p{i}" for i in range(50)], tokens_to_generate=10)
    assert [r["generation"] for r in rows] == [f"reply to p{i}" for i in range(50)]
    assert all(1 <= stub.answered[f"p{i}"] <= 1 + client_timeouts[f"p{i}"] for i in range(50))
    assert all(stub.requests[f"p{i}"] >= 4 for i in range(50))  # 3 faults, then the answer


@pytest.mark.parametrize(
    "server_type, params, message",
    [
        ("nemo", {}, "takes string prompts only"),
        ("megatron", {"min_p": 0.1}, "min_p is not supported"),
        ("megatron", {"temperature": 0.5, "top_k": 5, "top_p": 0.9}, "cannot use top_k and top_p together"),
        ("megatron", {"repetition_penalty": 1.2}, "repetition_penalty is not supported"),
        ("nemo", {"top_logprobs": 1}, "top_logprobs is not supported"),
    ],
)
def test_what_they_cannot_do_is_a_clear_error(server_type, params, message):
    prompt = [{"role": "user", "content": "hi"}] if not params else "hi"
    with get_model(server_type, port=1) as llm:
        with pytest.raises(ServegenError, match=message):
            llm.generate([prompt], **params)
