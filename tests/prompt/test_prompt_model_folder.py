"""A model folder's own chat template as the prompt template, rendered as transformers renders it."""

import json
from datetime import datetime

import pytest
from prompt_helpers import CASES, FIXTURES, hf_render, hf_tokenizer

from servegen.errors import ServegenError
from servegen.prompt import ModelChatTemplate, get_prompt


def model_folder(tmp_path, **files):
    """A folder with the given files: dicts are written as JSON, strings as they are."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        name = name.replace("__", ".")
        text = json.dumps(content, ensure_ascii=False) if isinstance(content, dict) else content
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_official_template_folders_render_as_transformers_does(fixture, case, config_dir, official):
    _, data = case
    prompt = get_prompt("chat", str(FIXTURES / fixture), config_dir=config_dir)
    assert isinstance(prompt.template, ModelChatTemplate)
    messages = prompt.build_messages(data, drop_empty_system=True)
    if fixture == "gemma-2" and messages[0]["role"] == "system":
        with pytest.raises(ServegenError, match=r"chat template of .*gemma-2 refused the conversation: System role not supported"):
            prompt.build_string(data)
    else:
        assert prompt.build_string(data) == official(fixture, messages)


def test_folder_saved_by_transformers(tmp_path):
    """transformers 5 saves the template as chat_template.jinja; AutoTokenizer loads it back."""
    from transformers import AutoTokenizer

    config = json.loads((FIXTURES / "llama3-instruct" / "tokenizer_config.json").read_text())
    hf_tokenizer(config["chat_template"], config["bos_token"], config["eos_token"]).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    prompt = get_prompt("generic/default", str(tmp_path))
    assert prompt.template.source == tmp_path / "chat_template.jinja"
    data = [{"question": "What's 2 + 2?", "assistant": "2 + 2 = 4."}, {"question": "And 3 + 3?"}]
    expected = hf_render(AutoTokenizer.from_pretrained(tmp_path), prompt.build_messages(data, drop_empty_system=True))
    assert prompt.build_string(data) == expected
    assert expected.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>")
    assert prompt.stop_phrases == ["<|eot_id|>"]


def test_demo_model_template_renders_its_training_format(tmp_path):
    """The demo model's template adds the empty system message Llama 3's leaves out, so through
    its folder generic/default gives what it was trained on."""
    from servegen.demo_model.data import BEGIN_OF_TEXT, EOT, format_prompt
    from servegen.demo_model.tokenizer import CHAT_TEMPLATE

    folder = model_folder(tmp_path, tokenizer_config__json={"chat_template": CHAT_TEMPLATE, "bos_token": BEGIN_OF_TEXT, "eos_token": EOT})
    assert get_prompt("generic/default", str(folder)).build_string({"question": "What's 2 + 2?"}) == format_prompt("What's 2 + 2?")


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    folder = model_folder(
        tmp_path,
        tokenizer_config__json={"chat_template": "config {{ messages[0].content }}", "bos_token": "<s>"},
        chat_template__jinja="{{ bos_token }}jinja {{ messages[0].content }}",
    )
    assert get_prompt("generic/default", str(folder)).build_string({"question": "Q"}) == "<s>jinja Q"


def test_named_templates_in_tokenizer_config_use_the_default(tmp_path):
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ messages[-1].content }}"}]
    folder = model_folder(tmp_path, tokenizer_config__json={"chat_template": templates})
    assert get_prompt("generic/default", str(folder)).build_string({"question": "Q"}) == "default Q"


def test_chat_template_json_is_the_last_place_looked(tmp_path):
    folder = model_folder(tmp_path, chat_template__json={"chat_template": "processor {{ messages[0].content }}"})
    assert get_prompt("generic/default", str(folder)).build_string({"question": "Q"}) == "processor Q"


def test_special_tokens_as_added_token_mappings_and_from_special_tokens_map(tmp_path):
    folder = model_folder(
        tmp_path,
        tokenizer_config__json={
            "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}",
            "bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False},
            "eos_token": "</s>",
        },
        special_tokens_map__json={"pad_token": {"content": "<pad>"}, "eos_token": "<ignored>"},
    )
    assert get_prompt("generic/default", str(folder)).build_string({"question": "Q"}) == "<｜begin▁of▁sentence｜>|</s>|<pad>"


def test_stop_phrases_from_eos_and_generation_config(tmp_path):
    folder = model_folder(
        tmp_path,
        tokenizer_config__json={
            "chat_template": "x",
            "eos_token": "<|end_of_text|>",
            "added_tokens_decoder": {"128001": {"content": "<|end_of_text|>"}, "128009": {"content": "<|eot_id|>"}},
        },
        generation_config__json={"eos_token_id": [128001, 128009]},
    )
    assert get_prompt("generic/default", str(folder)).stop_phrases == ["<|end_of_text|>", "<|eot_id|>"]
    # ids the config does not name are looked up in tokenizer.json
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 7, "content": "<|im_end|>"}]}))
    assert get_prompt("generic/default", str(folder)).stop_phrases == ["<|end_of_text|>", "<|im_end|>"]


def test_transformers_jinja_features(tmp_path):
    """The environment transformers gives chat templates: trim_blocks/lstrip_blocks, loop
    controls, a tojson that writes plain JSON, {% generation %}, strftime_now, raise_exception."""
    template = """\
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if loop.index > 2 %}{% break %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    <{{ message.role }}> {{ message | tojson }}
    {% if message.role == 'assistant' %}{% generation %}[{{ message.content }}]{% endgeneration %}{% endif %}
{%- endfor %}
{{ ns.n }} {{ {"b": "<&>", "a": [1, 2]} | tojson(indent=2, sort_keys=True) }}
year {{ strftime_now("%Y") }}
{%- if add_generation_prompt %} go{% endif %}
"""
    folder = model_folder(tmp_path, tokenizer_config__json={"chat_template": template})
    data = [{"question": "é \"q\"", "assistant": "r"}, {"question": "q2"}]
    prompt = get_prompt("generic/default", str(folder))
    built = prompt.build_string(data)
    assert built == hf_render(hf_tokenizer(template), prompt.build_messages(data, drop_empty_system=True))
    assert '{"role": "user", "content": "é \\"q\\""}' in built and "<&>" in built
    assert f"year {datetime.now().year}" in built and built.endswith(" go")


def test_raise_exception_is_a_clear_error(tmp_path):
    folder = model_folder(tmp_path, tokenizer_config__json={"chat_template": "{{ raise_exception('no ' + messages[0].role) }}"})
    with pytest.raises(ServegenError, match=r"the chat template of .*model refused the conversation: no user"):
        get_prompt("generic/default", str(folder)).build_string({"question": "Q"})


def test_template_syntax_error_names_the_file_and_line(tmp_path):
    folder = model_folder(tmp_path, chat_template__jinja="line one\n{% for m in messages %}\n")
    with pytest.raises(ServegenError, match=r"model/chat_template\.jinja: chat template syntax error on line \d"):
        get_prompt("generic/default", str(folder))


def test_folder_without_a_chat_template(tmp_path):
    folder = model_folder(tmp_path, tokenizer_config__json={"bos_token": "<s>"})
    with pytest.raises(ServegenError, match=r"model has no chat template: none in chat_template\.jinja, tokenizer_config\.json"):
        get_prompt("generic/default", str(folder))


def test_broken_tokenizer_config(tmp_path):
    folder = model_folder(tmp_path, tokenizer_config__json="{not json")
    with pytest.raises(ServegenError, match=r"cannot read .*tokenizer_config\.json"):
        get_prompt("generic/default", str(folder))
