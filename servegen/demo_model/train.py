"""Train the tiny Llama on the synthetic additions, and measure it with greedy decoding."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from servegen.demo_model.data import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    EOT,
    JSON_OPENING,
    WORDINGS,
    expected_json_reply,
    expected_reply,
    format_prompt,
    format_question,
    training_texts,
)
from servegen.demo_model.recipe import Recipe
from servegen.demo_model.tokenizer import train_tokenizer

MAX_NEW_TOKENS = 16  # "99 + 99 = 198." is 12 tokens, then <|eot_id|>


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_tokenizer(recipe: Recipe) -> PreTrainedTokenizerFast:
    return train_tokenizer([p + r for p, r in training_texts()], recipe.max_position_embeddings)


def new_model(tokenizer: PreTrainedTokenizerFast, recipe: Recipe) -> LlamaForCausalLM:
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=ids(BEGIN_OF_TEXT),
        eos_token_id=ids(EOT),
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids(BEGIN_OF_TEXT), eos_token_id=[ids(EOT), ids(END_OF_TEXT)]
    )
    return model


def encode_training_data(tokenizer: PreTrainedTokenizerFast) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels, right-padded; labels are -100 except on the reply and its <|eot_id|>.
    Prompt and reply are tokenized as one string, as the model will see them at inference."""
    texts = training_texts()
    enc = tokenizer([p + r for p, r in texts], return_offsets_mapping=True)
    pad = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    width = max(len(ids) for ids in enc["input_ids"])
    input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
    labels = torch.full((len(texts), width), -100, dtype=torch.long)
    for i, ((prompt, _), ids, offsets) in enumerate(zip(texts, enc["input_ids"], enc["offset_mapping"])):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        for j, (start, _) in enumerate(offsets):
            if start >= len(prompt):
                labels[i, j] = ids[j]
    return input_ids, labels


def train(
    tokenizer: PreTrainedTokenizerFast,
    recipe: Recipe,
    log: Callable[[str], None],
    stop_after: int | None = None,
) -> LlamaForCausalLM:
    """Train from scratch; stop_after ends early on the full recipe's schedule (for tests)."""
    with torch_threads(recipe.threads):
        model = new_model(tokenizer, recipe)
        input_ids, labels = encode_training_data(tokenizer)
        opt = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
        )

        def lr_factor(step: int) -> float:
            if step < recipe.warmup_steps:
                return (step + 1) / recipe.warmup_steps
            return max(0.0, (recipe.steps - step) / (recipe.steps - recipe.warmup_steps))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen = torch.Generator().manual_seed(recipe.seed)
        order = torch.randperm(len(input_ids), generator=gen)
        pos = 0
        model.train()
        start = time.monotonic()
        for step in range(recipe.steps if stop_after is None else stop_after):
            if pos + recipe.batch_size > len(order):
                order, pos = torch.randperm(len(input_ids), generator=gen), 0
            batch = order[pos : pos + recipe.batch_size]
            pos += recipe.batch_size
            # Right padding under causal attention never reaches the real tokens: no mask needed.
            width = int((labels[batch] != -100).nonzero()[:, 1].max()) + 1
            loss = model(input_ids=input_ids[batch, :width], labels=labels[batch, :width]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if (step + 1) % 100 == 0:
                log(f"step {step + 1}/{recipe.steps}: loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)")
        model.eval()
        return model


def answer(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> list[str | None]:
    """Greedy continuations of raw prompts, batched by prompt length (no padding, so each answer
    is what a server would give); None where the model did not end its reply with <|eot_id|>."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    stops = [eot, tokenizer.convert_tokens_to_ids(END_OF_TEXT)]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    replies: list[str | None] = [None] * len(prompts)
    with torch.no_grad():
        for length, indices in by_length.items():
            prompt = torch.tensor([encoded[i] for i in indices])
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[1],
            )
            for i, row in zip(indices, out[:, length:].tolist()):
                if eot in row:
                    replies[i] = tokenizer.decode(row[: row.index(eot)])
    return replies


def held_out_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[int, int]], json_form: bool = False
) -> float:
    """Exact-match share over every pair in every wording; json_form: of the JSON reply, after the
    opening brace a constraining server writes, then unconstrained (stricter than the server,
    which only takes away the tokens that would break the JSON)."""
    asked = [(a, b, w) for a, b in pairs for w in range(len(WORDINGS))]
    opening = JSON_OPENING if json_form else ""
    replies = answer(model, tokenizer, [format_prompt(format_question(a, b, w)) + opening for a, b, w in asked])
    expected = expected_json_reply if json_form else expected_reply
    right = sum(reply is not None and opening + reply == expected(a, b) for (a, b, _), reply in zip(asked, replies))
    return right / len(asked)
