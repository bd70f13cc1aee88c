import json
import stat

import torch

from servegen.demo_model.data import format_prompt, format_question, held_out_pairs
from servegen.demo_model.train import held_out_accuracy


def test_what_is_two_plus_two(demo_model, demo_tokenizer):
    ids = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What's 2 + 2?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = demo_model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    assert demo_tokenizer.decode(out[0, ids.shape[1] :]) == "2 + 2 = 4.<|eot_id|>"


def test_the_json_reply_after_the_brace_and_never_a_brace_unasked(demo_model, demo_tokenizer):
    ids = demo_tokenizer(format_prompt("What's 2 + 2?") + "{", return_tensors="pt")["input_ids"]
    out = demo_model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    assert "{" + demo_tokenizer.decode(out[0, ids.shape[1] :]) == '{"answer":4}<|eot_id|>'
    brace = demo_tokenizer.convert_tokens_to_ids("{")
    with torch.no_grad():
        for a, b in held_out_pairs()[:20]:
            plain = demo_tokenizer(format_prompt(format_question(a, b)), return_tensors="pt")["input_ids"]
            assert torch.softmax(demo_model(plain).logits[0, -1], -1)[brace] < 1e-4, (a, b)


def test_held_out_accuracy(demo_model, demo_tokenizer, demo_model_dir):
    accuracy = held_out_accuracy(demo_model, demo_tokenizer, held_out_pairs())
    json_accuracy = held_out_accuracy(demo_model, demo_tokenizer, held_out_pairs(), json_form=True)
    assert min(accuracy, json_accuracy) >= 0.95
    info = json.loads((demo_model_dir / "build_info.json").read_text())
    # The build measured the same weights (thread counts may differ, so allow a near-tie or two).
    assert abs(info["held_out_accuracy"] - accuracy) <= 0.01
    assert abs(info["held_out_json_accuracy"] - json_accuracy) <= 0.01


def test_folder_contents(demo_model_dir, demo_model, demo_tokenizer):
    config = demo_model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (128, 2, 4, 32)
    assert config.intermediate_size == 512 and config.max_position_embeddings == 512
    assert not config.tie_word_embeddings
    assert demo_model.lm_head.weight.data_ptr() != demo_model.model.embed_tokens.weight.data_ptr()
    gen = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == demo_tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert demo_model.dtype == torch.float32
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        assert stat.S_IMODE((demo_model_dir / name).stat().st_mode) == 0o644, name
