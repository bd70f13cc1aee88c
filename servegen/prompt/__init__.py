"""Prompts: a prompt config says what to ask (texts with {field} placeholders filled from a data
row), a template says how a model family spells a conversation with its special tokens.

    prompt = get_prompt("generic/default", "llama3-instruct")
    prompt.build_string({"question": "What's 2 + 2?"})    # for /v1/completions
    prompt.build_messages({"question": "What's 2 + 2?"})  # for /v1/chat/completions

docs/prompts.md has the formats, the multi-turn input and the list of templates.
"""

from servegen.prompt.chat_format import ChatFormat, load_template
from servegen.prompt.conversation import Conversation, Turn
from servegen.prompt.model_template import ModelChatTemplate
from servegen.prompt.prompt import ASSISTANT_FIELD, Prompt, get_prompt
from servegen.prompt.prompt_config import PromptConfig, load_config, load_examples

__all__ = [
    "ASSISTANT_FIELD",
    "ChatFormat",
    "Conversation",
    "ModelChatTemplate",
    "Prompt",
    "PromptConfig",
    "Turn",
    "get_prompt",
    "load_config",
    "load_examples",
    "load_template",
]
