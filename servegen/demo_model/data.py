"""The demo model's synthetic data: additions of two numbers in 0..99, asked in three wordings,
in the Llama 3 chat format with an empty system message, answered in two forms, and the held-out
split.

The plain reply is "2 + 2 = 4."; the JSON reply, {"answer":4}, is what the model gives once its
reply has begun with "{": a server constraining the output to a JSON object writes that brace
first (vLLM with structured outputs and the output_type {"answer": "int"}, compact, no free
whitespace). The brace is part of the prompt of a JSON example, never learnt as a target, so
asked plainly the model answers plainly, sampled too.

Other tests ask the built model held-out questions through a real server, e.g.:

    for a, b in held_out_pairs():
        ask(format_question(a, b)) == expected_reply(a, b)
"""

import random

WORDINGS = ("What's {a} + {b}?", "What is {a} + {b}?", "Compute {a} + {b}.")
MAX_OPERAND = 99
HELD_OUT_COUNT = 200
SPLIT_SEED = 1234

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
END_OF_TEXT = "<|end_of_text|>"
SPECIAL_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT, END_OF_TEXT)


def format_question(a: int, b: int, wording: int = 0) -> str:
    """The user message, e.g. "What's 2 + 2?" (wording 0), "What is 2 + 2?", "Compute 2 + 2."."""
    return WORDINGS[wording].format(a=a, b=b)


def expected_reply(a: int, b: int) -> str:
    """The assistant message the model answers with (before its <|eot_id|>): "2 + 2 = 4."."""
    return f"{a} + {b} = {a + b}."


def expected_json_reply(a: int, b: int) -> str:
    """The JSON reply, brace included, compact: '{"answer":4}'."""
    return f'{{"answer":{a + b}}}'


def format_prompt(question: str) -> str:
    """The raw prompt string for /v1/completions; the chat template renders exactly this for a
    conversation of one user message (Llama 3's format with an empty system message)."""
    return (
        f"{BEGIN_OF_TEXT}{START_HEADER}system{END_HEADER}\n\n{EOT}"
        f"{START_HEADER}user{END_HEADER}\n\n{question}{EOT}"
        f"{START_HEADER}assistant{END_HEADER}\n\n"
    )


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def held_out_pairs() -> list[tuple[int, int]]:
    """The 200 (a, b) pairs the model never saw in any wording, sorted; the same on every call."""
    return sorted(random.Random(SPLIT_SEED).sample(all_pairs(), HELD_OUT_COUNT))


def train_pairs() -> list[tuple[int, int]]:
    held_out = set(held_out_pairs())
    return [pair for pair in all_pairs() if pair not in held_out]


JSON_OPENING = "{"  # what the server writes before the model's JSON reply


def training_texts() -> list[tuple[str, str]]:
    """(prompt, reply + <|eot_id|>) for every training pair in every wording, in both forms (the
    JSON form's prompt ends with the opening brace)."""
    return [
        (prompt, reply + EOT)
        for a, b in train_pairs()
        for w in range(len(WORDINGS))
        for prompt, reply in (
            (format_prompt(format_question(a, b, w)), expected_reply(a, b)),
            (format_prompt(format_question(a, b, w)) + JSON_OPENING, expected_json_reply(a, b).removeprefix(JSON_OPENING)),
        )
    ]
