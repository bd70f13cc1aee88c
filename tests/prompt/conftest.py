"""Fixtures for the prompt tests (helpers in prompt_helpers.py)."""

import json
from pathlib import Path

import pytest
from prompt_helpers import FIXTURES, hf_render, hf_tokenizer


@pytest.fixture
def official():
    """official(fixture, messages): what the fixture's official template renders, via transformers."""

    def render(fixture: str, messages: list[dict]) -> str:
        config = json.loads((FIXTURES / fixture / "tokenizer_config.json").read_text())
        tokenizer = hf_tokenizer(config["chat_template"], config.get("bos_token"), config.get("eos_token"))
        return hf_render(tokenizer, messages)

    return render


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A folder of prompt configs for the tests; `chat` takes its system prompt from the row."""
    (tmp_path / "chat.yaml").write_text('system: "{system}"\nuser: "{question}"\n')
    return tmp_path
