from servegen.demo_model.data import (
    JSON_OPENING,
    WORDINGS,
    expected_json_reply,
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
    assert expected_json_reply(99, 99) == '{"answer":198}' and expected_json_reply(2, 2).startswith(JSON_OPENING)


def test_each_question_is_taught_in_both_forms_the_json_one_after_a_given_brace():
    texts = training_texts()
    plain, brace = format_prompt(format_question(2, 2)), format_prompt(format_question(2, 2)) + "{"
    assert [r for p, r in texts if p == plain] == ["2 + 2 = 4.<|eot_id|>"]
    assert [r for p, r in texts if p == brace] == ['"answer":4}<|eot_id|>']
    # the brace is never a target: no reply begins with it
    assert not any(r.startswith("{") for _, r in texts)


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
    assert len(prompts) == 2 * 3 * len(train)
    for a, b in held_out:
        for w in range(len(WORDINGS)):
            assert format_prompt(format_question(a, b, w)) not in prompts
            assert format_prompt(format_question(a, b, w)) + JSON_OPENING not in prompts
