import jinja2

from servegen.demo_model.data import format_prompt, format_question

# Meta-Llama-3-8B-Instruct's chat_template (tokenizer_config.json), as published.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3(messages, add_generation_prompt=True):
    return jinja2.Template(LLAMA3_TEMPLATE).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=add_generation_prompt
    )


def test_no_second_bos(demo_tokenizer):
    bos = demo_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    ids = demo_tokenizer(format_prompt("What's 2 + 2?"))["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    assert bos not in demo_tokenizer("2 + 2")["input_ids"]


def test_special_tokens_atomic_and_digits_single(demo_tokenizer):
    for token in ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]:
        assert len(demo_tokenizer(token)["input_ids"]) == 1, token
    tokens = demo_tokenizer.convert_ids_to_tokens(demo_tokenizer("1234 + 98")["input_ids"])
    assert [t for t in tokens if t.isdigit()] == ["1", "2", "3", "4", "9", "8"]
    assert demo_tokenizer.eos_token == "<|eot_id|>"
    assert len(demo_tokenizer(format_prompt("What's 2 + 2?"))["input_ids"]) == 24


def test_chat_template_renders_the_raw_prompt(demo_tokenizer):
    raw = format_prompt(format_question(2, 2))
    user = [{"role": "user", "content": "What's 2 + 2?"}]
    empty_system = [{"role": "system", "content": ""}] + user
    for messages in (user, empty_system):
        text = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == raw
        ids = demo_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == demo_tokenizer(raw)["input_ids"]
    # Exactly Llama 3's own rendering whenever a system message is given.
    assert llama3(empty_system) == raw
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2."},
        {"role": "user", "content": " Compute 3 + 4. "},
    ]
    for add in (True, False):
        assert demo_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add) == llama3(chat, add)
