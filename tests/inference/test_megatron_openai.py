"""The megatron_openai client (Megatron-LM's launch_inference_server.py) against the strict stub,
which checks each body against tests/inference/schemas/megatron_openai.json and answers in the
server's shape (the real server needs GPUs: see servegen/server/megatron_openai.py): several
prompts per request counted by each choice's generation_token_ids, chats, the sampling fields
always sent (top_p 0.0 for off), what it cannot do refused before anything is sent, stop phrases,
its logprobs with a None first, and its context-length error."""

import pytest

from servegen.errors import ServegenError
from servegen.inference import ContextLengthError, get_model

FAST = dict(retry_backoff=0.001, max_backoff=0.01)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "c"}]


def client(stub, **kwargs):
    return get_model("megatron_openai", base_url=stub.base_url, **{**FAST, **kwargs})


def test_several_prompts_share_a_request_only_when_asked(stub):
    stub.replies.update({"p1": "one two three four five", "p4": "x"})
    prompts = [f"p{i}" for i in range(6)]
    with client(stub) as llm:
        assert llm.prompts_per_request == 1  # its per-choice seeds depend on the place in a batch
        assert [r["generation"] for r in llm.generate(prompts)] == [stub.reply_for(p, 0) for p in prompts]
    assert stub.batch_sizes == [1] * 6
    stub.reset()
    with client(stub, prompts_per_request=4) as llm:
        rows = llm.generate(prompts, tokens_to_generate=5, random_seed=3)
    assert sorted(stub.batch_sizes) == [2, 4]
    assert [r["generation"] for r in rows] == [stub.reply_for(p, 0) for p in prompts]
    # each prompt's own count, from its choice's generation_token_ids (the usage is the request's)
    assert [r["num_generated_tokens"] for r in rows] == [3, 5, 3, 3, 1, 3]
    assert [r["finish_reason"] for r in rows] == ["stop", "length", "stop", "stop", "stop", "stop"]
    body = stub.bodies[0]
    assert body["prompt"] == prompts[:4] and body["seed"] == 3
    assert "model" not in body and "return_token_ids" not in body
    assert llm.model is None and stub.validated == {"megatron_openai": 2}


def test_chat_needs_no_model_name(stub):
    stub.models_status = 404  # the server has no /v1/models: nothing asks it
    with client(stub) as llm:
        row = llm.generate([CHAT], tokens_to_generate=8)[0]
        assert "".join(llm.stream(CHAT)) == "reply to c"
    assert row == {"generation": "reply to c", "num_generated_tokens": 3, "finish_reason": "stop"}
    assert llm.model is None
    assert stub.bodies[0] == {"messages": CHAT, "max_tokens": 8, "temperature": 0.0, "top_p": 0.0, "top_k": 0}
    assert stub.bodies[1]["stream"] is True


@pytest.mark.parametrize(
    "params, sent",
    [
        ({}, {"temperature": 0.0, "top_p": 0.0, "top_k": 0}),  # greedy: the server sets top_k 1 itself
        ({"temperature": 0.7}, {"temperature": 0.7, "top_p": 0.0, "top_k": 0}),  # 0.0 is off, not 1.0
        ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_p": 0.9, "top_k": 0}),
        ({"temperature": 0.7, "top_k": 40}, {"temperature": 0.7, "top_p": 0.0, "top_k": 40}),
        ({"top_k": 40, "top_p": 0.9}, {"temperature": 0.0, "top_p": 0.9, "top_k": 40}),  # greedy ignores both
        ({"random_seed": 0}, {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "seed": 0}),  # a seed alone samples
        ({"random_seed": 0, "temperature": 0.0}, {"temperature": 0.0, "top_p": 0.95, "top_k": 0, "seed": 0}),
    ],
)
def test_sampling_parameters_are_always_sent(stub, params, sent):
    """A field left out would take the model's generation_config.json value, and top_p 1.0 with
    top_k would trip its sampler's assert: each is sent, top_p off as 0.0."""
    with client(stub) as llm:
        assert llm.generate(["a"], **params)[0]["generation"] == "reply to a"
    assert stub.bodies[-1] == {"prompt": "a", "max_tokens": 512, **sent}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"min_p": 0.1}, "server_type megatron_openai: min_p is not supported"),
        ({"repetition_penalty": 1.2}, "server_type megatron_openai: repetition_penalty is not supported"),
        ({"temperature": 0.5, "top_k": 5, "top_p": 0.9}, "megatron_openai cannot use top_k and top_p together"),
        ({"random_seed": -1}, "server_type megatron_openai: random_seed must be >= 0"),
    ],
)
def test_what_it_cannot_apply_is_refused_before_anything_is_sent(stub, params, message):
    with client(stub) as llm:
        for prompt in ("a", CHAT):
            with pytest.raises(ServegenError, match=message) as e:
                llm.generate([prompt], **params)
            assert "\n" not in str(e.value)
    assert stub.bodies == []


def test_stop_phrases_cut_by_the_server_or_kept_by_the_client(stub):
    stub.replies["k"] = "one. two. three"
    with client(stub) as llm:
        row = llm.generate(["k"], stop_phrases=[". "])[0]
        assert (row["generation"], row["finish_reason"]) == ("one", "stop")
        assert stub.bodies[-1]["stop"] == [". "]
        # the engine would cut the phrase off and has no field to keep it: not sent, cut here after it
        row = llm.generate(["k"], stop_phrases=[". "], remove_stop_phrases=False)[0]
        assert (row["generation"], row["finish_reason"]) == ("one. ", "stop")
        assert "stop" not in stub.bodies[-1]


def test_logprobs_line_up_with_the_tokens(stub):
    """Its completions put a None first in token_logprobs and top_logprobs even without echo."""
    with client(stub) as llm:
        row = llm.generate(["l"], top_logprobs=2)[0]
        assert row["tokens"] == ["reply", "to", "l"]
        assert row["logprobs"] == [-0.5] * 3
        assert row["top_logprobs"] == [{"reply": -0.5}, {"to": -0.5}, {"l": -0.5}]
        row = llm.generate(["l"], top_logprobs=0)[0]
        assert (row["tokens"], row["logprobs"]) == (["reply", "to", "l"], [-0.5] * 3)
        assert llm.generate([CHAT], top_logprobs=1)[0]["tokens"] == ["reply", "to", "c"]
    assert [b.get("logprobs") for b in stub.bodies] == [2, 0, True]
    assert stub.bodies[-1]["top_logprobs"] == 1


def test_typed_outputs_are_validated_on_the_client_only(stub):
    stub.replies.update({"t": ['{"age": "three"}', '{"age": 3}'], "c": '{"age": 4}'})
    with client(stub) as llm:
        assert llm.generate(["t"], output_type={"age": "int"}, random_seed=1)[0]["output"] == {"age": 3}
        assert llm.generate([CHAT], output_type={"age": "int"})[0]["output"] == {"age": 4}
    assert [b["seed"] for b in stub.bodies[:2]] == [1, 2]  # retried with the seed moved on
    assert not any("response_format" in b for b in stub.bodies)


def test_a_prompt_over_the_context_length_is_its_own_error(stub):
    with client(stub, prompts_per_request=4) as llm:
        rows = llm.generate(["a", "TOO_LONG", "b"], soft_fail=True)
    assert [r["generation"] for r in rows[::2]] == ["reply to a", "reply to b"]
    assert "MaxSequenceLengthOverflowError" in rows[1]["error"]
    with client(stub) as llm, pytest.raises(ContextLengthError, match="HTTP 400 on /v1/completions"):
        llm.generate(["TOO_LONG"])
