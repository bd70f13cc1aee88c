"""Every template's prompt string for single- and multi-turn input, checked against golden files
(tests/prompt/golden/; regenerate with SERVEGEN_UPDATE_GOLDEN=1 and review the diff)."""

import pytest

from servegen.prompt import get_prompt
from servegen.prompt.chat_format import TEMPLATE_DIR
from servegen.prompt.loading import available

TEMPLATES = ["chatml", "deepseek", "gemma", "llama2-chat", "llama3-instruct", "mistral", "phi3", "qwen"]
MULTI_TURN = [
    {"system": "You are a careful assistant.", "question": "What's 2 + 2?", "assistant": "2 + 2 = 4."},
    {"question": "And 3 + 3?", "assistant": "3 + 3 = 6."},
    {"question": "What's 10 + 5?"},
]


def test_every_packaged_template_has_goldens():
    assert available(TEMPLATE_DIR) == TEMPLATES


@pytest.mark.parametrize("template", TEMPLATES)
def test_single_turn_without_system(template, golden):
    text = get_prompt("generic/default", template).build_string({"question": "What's 2 + 2?"})
    golden(f"{template}-single.txt", text)


@pytest.mark.parametrize("template", TEMPLATES)
def test_single_turn_with_system(template, config_dir, golden):
    data = {"system": "You are a careful assistant.", "question": "What's 2 + 2?"}
    golden(f"{template}-single-system.txt", get_prompt("chat", template, config_dir=config_dir).build_string(data))


@pytest.mark.parametrize("template", TEMPLATES)
def test_multi_turn(template, config_dir, golden):
    golden(f"{template}-multi.txt", get_prompt("chat", template, config_dir=config_dir).build_string(MULTI_TURN))


def test_math_config_with_few_shot_examples(golden):
    prompt = get_prompt("generic/math", "llama3-instruct", examples_type="math_word_problems")
    golden("math-few-shot-llama3-instruct.txt", prompt.build_string({"problem": "What is 6 times 7?"}))
