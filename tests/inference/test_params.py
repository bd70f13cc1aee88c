"""Parameters: scalars or per-prompt lists, checked before anything is sent, with messages that
name the parameter (and the prompt) to fix."""

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest

from servegen.errors import ServegenError
from servegen.generation.config import InferenceConfig
from servegen.inference import Client, get_model
from servegen.inference.params import GREEDY, SAMPLING, Plan


def test_scalars_are_shared_by_every_prompt():
    plan = Plan(3, {"temperature": 0.5, "top_k": -1, "stop_phrases": ["a", "b"]})
    assert plan.params(0) is plan.params(2)
    p = plan.params(1)
    assert (p.temperature, p.top_k, p.stop_phrases) == (0.5, 0, ("a", "b"))


def test_per_prompt_lists():
    plan = Plan(
        3,
        {
            "temperature": [0.0, 0.5, 1.0],
            "tokens_to_generate": (1, 2, 3),
            "stop_phrases": [["x"], None, ["y", "z"]],
            "random_seed": [None, 1, 2],
            "output_type": [None, {"a": "int"}, None],
            "json_schema": None,
        },
    )
    assert [plan.params(i).temperature for i in range(3)] == [0.0, 0.5, 1.0]
    assert [plan.params(i).tokens_to_generate for i in range(3)] == [1, 2, 3]
    assert [plan.params(i).stop_phrases for i in range(3)] == [("x",), (), ("y", "z")]
    assert [plan.params(i).random_seed for i in range(3)] == [None, 1, 2]
    assert [plan.params(i).spec is None for i in range(3)] == [True, False, True]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": [0.1, 0.2]}, r"temperature has 2 values for 3 prompts"),
        ({"temperature": [0.1, -1, 0.2]}, r"temperature\[1\]: temperature must be a number >= 0, got -1"),
        ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_k": -2}, r"top_k must be -1 or 0 \(off\) or an integer >= 1"),
        ({"tokens_to_generate": 0}, r"tokens_to_generate must be an integer >= 1"),
        ({"tokens_to_generate": 2.5}, r"tokens_to_generate must be an integer"),
        ({"min_p": 2}, r"min_p must be a number in \[0, 1\]"),
        ({"random_seed": "7"}, r"random_seed must be an integer or None"),
        ({"stop_phrases": ["a", ["b"], "c"]}, r"stop_phrases mixes strings and lists"),
        ({"stop_phrases": [""]}, r"stop_phrases must be None, a string or a list of non-empty strings"),
        ({"timeout": 0}, r"timeout must be a number of seconds > 0"),
        ({"remove_stop_phrases": "yes"}, r"remove_stop_phrases must be True or False"),
        ({"top_logprobs": -1}, r"top_logprobs must be None or an integer >= 0"),
        ({"temprature": 1.0}, r"unknown generation parameter 'temprature'"),
        ({"output_type": {"a": "int"}, "json_schema": {"type": "object"}}, r"pass output_type= or json_schema=, not both"),
        ({"output_type": {"a": "date"}}, r"output_type field 'a' has type 'date'"),
        ({"output_type": [{"a": "int"}, {"a": "date"}, None]}, r"prompt 1: output_type field 'a'"),
        ({"json_schema": {"type": "no-such-type"}}, r"json_schema is not a valid JSON schema"),
        ({"extra_body": "x"}, r"extra_body must be a dict"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ServegenError, match=message):
        plan = Plan(3, values)
        for i in range(3):
            plan.params(i)


def test_iterator_form_takes_per_row_values_in_items():
    plan = Plan(None, {"temperature": 0.3})
    prompt, p = plan.for_item({"prompt": "x", "temperature": 0.9, "stop_phrases": "\n"})
    assert (prompt, p.temperature, p.stop_phrases) == ("x", 0.9, ("\n",))
    prompt, p = plan.for_item("y")
    assert (prompt, p.temperature) == ("y", 0.3)
    with pytest.raises(ServegenError, match="put per-prompt|give per-prompt values in each item"):
        Plan(None, {"temperature": [0.1, 0.2]})
    with pytest.raises(ServegenError, match='needs a "prompt" key'):
        plan.for_item({"question": "x"})


def test_generate_checks_prompts_before_sending():
    llm = get_model("vllm", base_url="http://127.0.0.1:1", model="m")  # nothing listens there
    with pytest.raises(ServegenError, match=r"pass \[prompt\]"):
        llm.generate("one prompt")
    with pytest.raises(ServegenError, match="one chat conversation"):
        llm.generate([{"role": "user", "content": "hi"}])
    with pytest.raises(ServegenError, match="temperature has 1 values for 2 prompts"):
        llm.generate(["a", "b"], temperature=[0.5])
    assert llm.generate([]) == []
    llm.close()


def test_get_model_checks_its_arguments():
    with pytest.raises(ServegenError, match="server_type must be one of vllm, sglang, trtllm, nemo, megatron, megatron_openai, hf, openai"):
        get_model("tgi")
    with pytest.raises(ServegenError, match="base_url= or host=/port=, not both"):
        get_model("vllm", host="x", base_url="http://x:1")
    with pytest.raises(ServegenError, match="base_url must look like"):
        get_model("vllm", base_url="x:1")
    with pytest.raises(ServegenError, match="max_concurrent_requests must be an integer >= 1"):
        get_model("vllm", max_concurrent_requests=0)
    with pytest.raises(ServegenError, match="structured_decoding= is for server_type trtllm"):
        get_model("vllm", structured_decoding=True)


def test_where_get_model_points():
    assert get_model("vllm").base_url == "http://127.0.0.1:5000"
    assert get_model("sglang", host="node7", port=30000).base_url == "http://node7:30000"
    assert get_model("openai", api_key="k").base_url == "https://api.openai.com"
    nim = get_model("openai", base_url="https://integrate.api.nvidia.com/v1/", api_key="k")
    assert nim.base_url == "https://integrate.api.nvidia.com"
    assert get_model("openai", host="127.0.0.1", port=8000).base_url == "http://127.0.0.1:8000"


# --- the sampling parameters, declared once (servegen.inference.params.Sampling) ---

REPO = Path(__file__).resolve().parents[2]


def doc_table(path: Path, first_cell: str) -> dict[str, list[str]]:
    """{name: the other cells} of the markdown table rows whose first cell is `first_cell` % name."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(first_cell, cells[0]) if line.startswith("|") else None
        if m:
            rows[m.group(1)] = cells[1:]
    return rows


def test_generate_takes_the_declared_sampling_parameters_with_their_defaults():
    signature = inspect.signature(Client.generate).parameters
    for name, setting in SAMPLING.items():
        assert signature[name].default == setting.default, name
    # the job's inference config is the declaration, then the client's options
    assert [f.name for f in fields(InferenceConfig)][: len(SAMPLING)] == list(SAMPLING)


def test_the_docs_tables_are_the_declaration():
    clients = doc_table(REPO / "docs" / "clients.md", r"`(\w+)`")
    job = doc_table(REPO / "docs" / "generation.md", r"`inference\.(\w+)`")
    for name, setting in SAMPLING.items():
        default, rule, doc = setting.default, setting.metadata["rule"], setting.metadata["doc"]
        if name in GREEDY:  # unset
            assert clients[name][:1] == ["unset (`None`)"], name
        else:
            assert clients[name][:1] == [f"`{default!r}`" if default is not None else "`None`"], name
        assert clients[name][1:] == [rule, doc], name
        assert job[name] == [f"`{default!r}`" if default is not None else "`null`", doc], name


def test_unset_temperature_and_top_p_are_greedy_or_with_a_seed_nemo_skills_sampling():
    assert (Plan(1, {}).params(0).temperature, Plan(1, {}).params(0).top_p) == (0.0, 1.0)
    seeded = Plan(1, {"random_seed": 3}).params(0)
    assert (seeded.temperature, seeded.top_p, seeded.top_k) == (0.7, 0.95, 0)
    given = Plan(1, {"random_seed": 3, "temperature": 0.0}).params(0)
    assert (given.temperature, given.top_p) == (0.0, 0.95)  # each given value wins on its own
    per_prompt = Plan(2, {"random_seed": [None, 5]})
    assert [(per_prompt.params(i).temperature, per_prompt.params(i).top_p) for i in (0, 1)] == [(0.0, 1.0), (0.7, 0.95)]
    _, item = Plan(None, {}).for_item({"prompt": "x", "random_seed": 1})
    assert (item.temperature, item.top_p) == (0.7, 0.95)
    with pytest.raises(ServegenError, match=r"top_p must be a number in \(0, 1\], got 0"):
        Plan(1, {"top_p": 0})


def test_client_options_are_declared_once_for_get_model_and_the_job():
    from servegen.generation.config import GenerationConfig
    from servegen.inference.options import DEFAULT, ClientOptions

    with pytest.raises(ServegenError, match="unknown client option 'max_retry'; known: max_concurrent_requests, "):
        get_model("vllm", max_retry=3)
    with pytest.raises(ServegenError, match="max_retries must be an integer >= 0, got -1"):
        get_model("vllm", max_retries=-1)
    llm = get_model("vllm", max_retries=2, timeout=5, soft_fail=True)
    assert (llm.max_retries, llm.timeout, llm.soft_fail, llm.retry_backoff) == (2, 5.0, True, DEFAULT.retry_backoff)
    job = GenerationConfig()
    assert (job.inference.max_retries, job.inference.retry_backoff, job.inference.max_backoff) == (
        DEFAULT.max_retries, DEFAULT.retry_backoff, DEFAULT.max_backoff)
    assert (job.max_concurrent_requests, job.prompts_per_request) == (None, None) == (
        DEFAULT.max_concurrent_requests, DEFAULT.prompts_per_request)
    assert {f.name for f in fields(ClientOptions)} >= {"max_retries", "timeout", "transport", "soft_fail"}


def test_the_docs_list_the_client_options_with_their_defaults():
    from servegen.inference.options import DEFAULT, ClientOptions

    text = (REPO / "docs" / "clients.md").read_text()
    block = text.split("# config takes its defaults from there too):\n", 1)[1].split("```", 1)[0]
    documented = dict(item.strip().split("=") for item in block.replace("#", "").replace("\n", ",").split(",") if item.strip())
    assert documented == {f.name: repr(getattr(DEFAULT, f.name)) for f in fields(ClientOptions)}
