"""servegen's templates against each family's official chat template, rendered by transformers."""

import pytest

from servegen.prompt import get_prompt
from prompt_helpers import CASES

# servegen template -> fixture holding the official template it reproduces
FAMILIES = {
    "llama3-instruct": "llama3-instruct",
    "llama2-chat": "llama2-chat",
    "chatml": "chatml",
    "qwen": "qwen",
    "mistral": "mistral",
    "gemma": "gemma",
    "phi3": "phi3",
    "deepseek": "deepseek",
}


def official_messages(prompt, data) -> list[dict]:
    """The conversation the official template gets: the messages a job sends (no empty system
    message), plus the empty system message that a template with `empty_system: block` writes a
    block for."""
    messages = prompt.build_messages(data, drop_empty_system=True)
    if prompt.template.empty_system == "block" and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}, *messages]
    return messages


@pytest.mark.parametrize("template", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_build_string_equals_official_template(template, case, config_dir, official):
    _, data = case
    prompt = get_prompt("chat", template, config_dir=config_dir)
    assert prompt.build_string(data) == official(FAMILIES[template], official_messages(prompt, data))


@pytest.mark.parametrize("case", [c for c in CASES if not c[0].startswith("system")], ids=lambda c: c[0])
def test_gemma_equals_gemma_2_template_without_system_prompt(case, config_dir, official):
    _, data = case
    prompt = get_prompt("chat", "gemma", config_dir=config_dir)
    messages = prompt.build_messages(data, drop_empty_system=True)
    assert messages[0]["role"] != "system"  # Gemma 2's template refuses one
    assert prompt.build_string(data) == official("gemma-2", messages)


def test_cases_reach_every_code_path():
    """The cases above would prove little if none had a system prompt, whitespace to trim or
    several turns."""
    names = [name for name, _ in CASES]
    assert any(n.startswith("system") for n in names) and any("multi" in n for n in names)
    assert any("padded" in n for n in names) and any(not n.startswith("system") for n in names)


def test_llama3_default_config_matches_official_template_with_empty_system(official):
    """docs/prompts.md: generic/default with llama3-instruct is what Llama 3's own template
    renders for an empty system message and the question, assistant header open."""
    data = {"question": "What's 2 + 2?"}
    built = get_prompt("generic/default", "llama3-instruct").build_string(data)
    expected = official(
        "llama3-instruct", [{"role": "system", "content": ""}, {"role": "user", "content": "What's 2 + 2?"}]
    )
    assert built == expected
    assert built == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_official_template_without_system_message_has_no_system_block(official):
    """The other reading of "no system prompt": the official template given no system message at
    all writes no system block. That is what a chat endpoint renders from the messages a job sends
    (build_messages(..., drop_empty_system=True))."""
    messages = get_prompt("generic/default").build_messages({"question": "What's 2 + 2?"}, drop_empty_system=True)
    assert messages == [{"role": "user", "content": "What's 2 + 2?"}]
    assert official("llama3-instruct", messages) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_default_config_is_the_demo_model_training_format():
    from servegen.demo_model.data import format_prompt

    prompt = get_prompt("generic/default", "llama3-instruct")
    for question in ("What's 2 + 2?", "What is 31 + 58?", "Compute 7 + 0."):
        assert prompt.build_string({"question": question}) == format_prompt(question)
