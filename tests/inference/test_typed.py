"""Typed outputs: output_type and json_schema become one JSON schema; every generation is parsed
and validated strictly; a server that returns something invalid is asked again (bounded), and
an output that never validates is never returned as if it did."""

import pydantic
import pytest

from servegen.inference import InvalidOutput, get_model
from servegen.inference.typed import output_spec


class Weather(pydantic.BaseModel):
    city: str
    celsius: int = pydantic.Field(ge=-90, le=60)


def test_output_type_schema():
    spec = output_spec(output_type={"age": "int", "units": str, "scores": list[float], "ok": "bool"})
    assert spec.schema == {
        "type": "object",
        "properties": {
            "age": {"type": "integer"},
            "units": {"type": "string"},
            "scores": {"type": "array", "items": {"type": "number"}},
            "ok": {"type": "boolean"},
        },
        "required": ["age", "units", "scores", "ok"],
        "additionalProperties": False,
    }
    assert output_spec(output_type={"age": "int"}) is output_spec(output_type={"age": int})  # compiled once


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"age": 41, "units": "years"}', {"age": 41, "units": "years"}),
        ('  {"age": 41.0, "units": "years"}\n', {"age": 41, "units": "years"}),
        ('```json\n{"age": 3, "units": "days"}\n```', {"age": 3, "units": "days"}),
    ],
)
def test_valid_outputs(text, expected):
    value = output_spec(output_type={"age": "int", "units": "str"}).parse(text)
    assert value == expected and type(value["age"]) is int


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"age": "41", "units": "years"}', r"age: '41' is not of type 'integer'"),
        ('{"age": 41.5, "units": "years"}', r"age: 41.5 is not of type 'integer'"),
        ('{"age": true, "units": "years"}', r"age: True is not of type 'integer'"),
        ('{"age": 41}', r"'units' is a required property"),
        ('{"age": 41, "units": "y", "more": 1}', r"Additional properties are not allowed"),
        ('{"age": 41, "units": "y"', r"not JSON"),
        ("41 years", r"not JSON"),
    ],
)
def test_invalid_outputs(text, message):
    with pytest.raises(ValueError, match=message):
        output_spec(output_type={"age": "int", "units": "str"}).parse(text)


def test_pydantic_model_gives_an_instance():
    spec = output_spec(json_schema=Weather)
    assert spec.name == "Weather" and spec.schema["properties"]["celsius"]["maximum"] == 60
    assert spec.parse('{"city": "Oslo", "celsius": 4}') == Weather(city="Oslo", celsius=4)
    with pytest.raises(ValueError, match=r"celsius: Input should be less than or equal to 60"):
        spec.parse('{"city": "Oslo", "celsius": 99}')


def test_invalid_then_valid_is_retried(stub):
    stub.replies["q"] = ['{"answer": "four"}', "not json at all", '{"answer": 4}']
    with get_model("vllm", base_url=stub.base_url) as llm:
        row = llm.generate(["q"], output_type={"answer": "int"}, random_seed=7)[0]
    assert row["output"] == {"answer": 4} and row["generation"] == '{"answer": 4}'
    assert stub.requests["q"] == 3
    assert [b["seed"] for b in stub.bodies] == [7, 8, 9]  # the same seed would give the same answer
    assert all(b["structured_outputs"] == {"json": output_spec(output_type={"answer": "int"}).schema} for b in stub.bodies)


def test_never_valid_is_an_error_or_an_error_row(stub):
    stub.replies["q"] = '{"answer": "four"}'
    with get_model("hf", base_url=stub.base_url, max_output_retries=1) as llm:
        with pytest.raises(InvalidOutput, match=r"prompt 0: .*not a valid typed output after 2 attempts: answer: 'four'") as e:
            llm.generate(["q"], output_type={"answer": "int"})
        assert e.value.generation == '{"answer": "four"}' and e.value.num_generated_tokens == 2
        row = llm.generate(["q", "fine"], output_type=[{"answer": "int"}, None], soft_fail=True)
    assert row[0]["output"] is None and row[0]["generation"] == '{"answer": "four"}' and "answer: 'four'" in row[0]["error"]
    assert row[0]["num_generated_tokens"] == 2  # the stub counts words: the failed text's tokens, not 0
    assert row[1] == {"generation": "reply to fine", "num_generated_tokens": 3, "finish_reason": "stop"}
    assert stub.requests["q"] == 4


def test_chat_typed_output_with_a_pydantic_class(stub):
    messages = [{"role": "user", "content": "weather?"}]
    stub.replies["weather?"] = '{"city": "Oslo", "celsius": 4}'
    with get_model("sglang", base_url=stub.base_url) as llm:
        row = llm.generate([messages], json_schema=Weather)[0]
    assert row["output"] == Weather(city="Oslo", celsius=4)
    assert stub.bodies[-1]["response_format"]["json_schema"]["name"] == "Weather"
