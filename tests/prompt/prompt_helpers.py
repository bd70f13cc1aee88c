"""Shared by the prompt tests: the conversations they render, and the official chat templates
(tests/prompt/fixtures/, see its README) rendered by transformers itself through a tokenizer built
here without any model hub."""

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

# (name, data) rendered with the `chat` config (system prompt and question from the row)
CASES = [
    ("single", {"system": "", "question": "What's 2 + 2?"}),
    ("system-single", {"system": "You are a careful assistant.", "question": "What's 2 + 2?"}),
    # official templates differ in what they trim: padding shows each one's rule
    ("system-single-padded", {"system": "  Answer briefly.\n", "question": "  What's 2 + 2?\n\n"}),
    (
        "system-multi",
        [
            {"system": "You are a pirate.", "question": "Hi!", "assistant": "Arr, ahoy."},
            {"question": "Who are you?", "assistant": "  A pirate of the seven seas. "},
            {"question": "Bye."},
        ],
    ),
    (
        "multi",
        [
            {"system": "", "question": "What's 2 + 2?", "assistant": "2 + 2 = 4."},
            {"question": "\nAnd 3 + 3? "},
        ],
    ),
]


def hf_tokenizer(chat_template: str, bos_token: str | None = None, eos_token: str | None = None):
    """A transformers fast tokenizer with a one-word vocabulary: enough for apply_chat_template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=chat_template,
    )


def hf_render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
