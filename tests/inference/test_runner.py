"""Runner: one call from a script, plain results back."""

import pytest

from servegen.errors import ServegenError
from servegen.inference import Runner


def test_call_one_many_and_typed(stub):
    stub.replies["What's 2 + 2?"] = '{"answer": 4}'
    with Runner(server_type="vllm", base_url=stub.base_url, system_prompt="Be brief.") as runner:
        assert runner.call("How are you?") == "reply to How are you?"
        assert runner.call(["a", "b"]) == ["reply to a", "reply to b"]
        assert runner.call("What's 2 + 2?", output_type={"answer": "int"}) == {"answer": 4}
        assert runner.call({"question": "c"}, temperature=0.5) == "reply to c"
    assert stub.bodies[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How are you?"},
    ]
    assert stub.bodies[-1]["temperature"] == 0.5
    assert "response_format" in stub.bodies[-2]


def test_no_system_prompt_no_system_message(stub):
    with Runner(base_url=stub.base_url, model="m") as runner:
        runner.call("hi")
    assert stub.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_string_only_servers_need_a_template():
    with Runner(server_type="nemo", port=1) as runner:
        with pytest.raises(ServegenError, match="takes string prompts only"):
            runner.call("hi")


def test_template_builds_the_exact_string_and_its_stop_phrases(stub):
    with Runner(base_url=stub.base_url, template="llama3-instruct", system_prompt="Be brief.") as runner:
        runner.call("What's 2 + 2?")
        runner.call("x", stop_phrases=["\n"])
    assert stub.bodies[0]["prompt"] == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert stub.bodies[0]["stop"] == ["<|eot_id|>"]
    assert stub.bodies[1]["stop"] == ["\n"]
