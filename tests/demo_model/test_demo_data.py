from servegen.demo_model.data import (
    WORDINGS,
    expected_reply,
    format_prompt,
    format_question,
    held_out_pairs,
    train_pairs,
    training_texts,
)


def test_prompt_is_llama3_format_with_empty_system_message():
    assert format_prompt(format_question(2, 2)) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert [format_question(12, 7, w) for w in range(len(WORDINGS))] == [
        "What's 12 + 7?",
        "What is 12 + 7?",
        "Compute 12 + 7.",
    ]
    assert expected_reply(99, 99) == "99 + 99 = 198."


def test_held_out_split_is_fixed_and_disjoint_from_training():
    held_out = held_out_pairs()
    assert held_out == held_out_pairs()
    assert len(set(held_out)) == 200
    assert all(0 <= a <= 99 and 0 <= b <= 99 for a, b in held_out)
    train = set(train_pairs())
    assert len(train) == 100 * 100 - 200
    assert not train & set(held_out)
    assert (2, 2) in train
    # No wording of a held-out pair appears anywhere in the training text.
    prompts = {prompt for prompt, _ in training_texts()}
    assert len(prompts) == 3 * len(train)
    for a, b in held_out:
        for w in range(len(WORDINGS)):
            assert format_prompt(format_question(a, b, w)) not in prompts
