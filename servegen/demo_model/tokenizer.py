"""A byte-level BPE tokenizer trained on the synthetic data, with Llama 3's special tokens and chat
template."""

import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from servegen.demo_model.data import BEGIN_OF_TEXT, EOT, SPECIAL_TOKENS

# Llama 3's official template, plus an empty system message when the conversation has none, so
# that a chat request with one user message renders the raw prompt the model was trained on
# (data.format_prompt). With an explicit system message it renders what Llama 3's does.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{%- set messages = [{'role': 'system', 'content': ''}] + messages -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -%}"
    "{%- if loop.index0 == 0 -%}{%- set content = bos_token + content -%}{%- endif -%}"
    "{{- content -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
VOCAB_SIZE_LIMIT = 512  # an upper bound: the data runs out of merges first


def train_tokenizer(texts: list[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """Digits split one per token (so numbers are spelled digit by digit), braces too (so a JSON
    reply begins with the one token "{", whichever token a constraining server lets through
    first), special tokens atomic, and no post-processor: the prompt string carries
    <|begin_of_text|> itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[{}]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE_LIMIT,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer would merge the special tokens' spelling like any text: train on what lies between.
    special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    tok.train_from_iterator((piece for text in texts for piece in special.split(text) if piece), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
