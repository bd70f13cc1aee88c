"""Prompt configs: messages, multi-turn input, few-shot examples, Jinja2 user texts and the errors
a user can make."""

from pathlib import Path

import pytest
import setuptools

from servegen.errors import ServegenError
from servegen.prompt import get_prompt, load_examples
from servegen.prompt.loading import PACKAGE_DIR


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


# --- build_messages -----------------------------------------------------------------------------


def test_build_messages_starts_with_the_system_message_even_empty_as_nemo_skills_prints_it():
    prompt = get_prompt("generic/default")
    assert prompt.build_messages({"question": "What's 2 + 2?"}) == [
        {"role": "system", "content": ""}, {"role": "user", "content": "What's 2 + 2?"}
    ]
    assert prompt.build_messages({"question": "What's 2 + 2?", "answer": 4}, drop_empty_system=True) == [
        {"role": "user", "content": "What's 2 + 2?"}
    ]


def test_build_messages_with_system_message(config_dir):
    prompt = get_prompt("chat", config_dir=config_dir)
    assert prompt.build_messages({"system": "Be brief.", "question": "Hi"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_build_messages_needs_no_template_but_build_string_does():
    prompt = get_prompt("generic/default")
    assert prompt.template is None and prompt.stop_phrases == []
    with pytest.raises(ServegenError, match=r"generic/default\.yaml has no template.*llama3-instruct"):
        prompt.build_string({"question": "Hi"})


def test_multi_turn_messages(config_dir):
    prompt = get_prompt("chat", config_dir=config_dir)
    turns = [
        {"system": "Be brief.", "question": "What's 2 + 2?", "assistant": "4."},
        {"question": "And 3 + 3?"},
    ]
    assert prompt.build_messages(turns) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]


def test_multi_turn_system_prompt_comes_from_the_first_turn(tmp_path):
    config = write(tmp_path, "c.yaml", 'system: "You are {persona}."\nuser: "{question}"\n')
    turns = [{"persona": "a pirate", "question": "Hi", "assistant": "Arr."}, {"question": "Bye"}]
    assert get_prompt(config).build_messages(turns)[0] == {"role": "system", "content": "You are a pirate."}


def test_multi_turn_needs_each_earlier_reply():
    prompt = get_prompt("generic/default", "chatml")
    with pytest.raises(ServegenError, match=r"turn 1 needs its reply as a string in field 'assistant'"):
        prompt.build_string([{"question": "Hi"}, {"question": "Bye"}])


def test_multi_turn_last_turn_cannot_have_a_reply():
    prompt = get_prompt("generic/default")
    with pytest.raises(ServegenError, match=r"last turn \(turn 2\) is the one the model answers"):
        prompt.build_messages([{"question": "Hi", "assistant": "Hello"}, {"question": "Bye", "assistant": "x"}])


def test_single_row_may_carry_any_other_fields():
    messages = get_prompt("generic/default").build_messages({"question": "Hi", "assistant": "ref", "id": 3})
    assert messages == [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("data", [[], "What's 2 + 2?", None, [{"question": "Hi", "assistant": "x"}, "Bye"]])
def test_data_must_be_a_row_or_a_list_of_turns(data):
    with pytest.raises(ServegenError, match=r"prompt data"):
        get_prompt("generic/default").build_messages(data)


# --- placeholders and their errors --------------------------------------------------------------


def test_missing_field_names_the_field_and_the_config():
    with pytest.raises(ServegenError) as error:
        get_prompt("generic/default").build_messages({"problem": "1 + 1"})
    message = str(error.value)
    assert "generic/default.yaml key 'user' needs field 'question'" in message
    assert "the row does not have (its fields: problem)" in message


def test_missing_field_in_a_later_turn_names_the_turn():
    with pytest.raises(ServegenError, match=r"needs field 'question', which turn 2 does not have"):
        get_prompt("generic/default").build_messages([{"question": "Hi", "assistant": "Hello"}, {"q": "Bye"}])


def test_literal_braces_and_attribute_placeholders(tmp_path):
    config = write(tmp_path, "c.yaml", 'user: "Put it in \\\\boxed{{}}: {item[name]} x{count}"\n')
    text = get_prompt(config).build_messages({"item": {"name": "apples"}, "count": 3})[-1]["content"]
    assert text == "Put it in \\boxed{}: apples x3"


@pytest.mark.parametrize(
    "user, match",
    [
        ('"a { b"', r"key 'user'.*write \{\{ and \}\} for literal braces"),
        ('"{} and {0}"', r"key 'user': every placeholder needs a field name"),
    ],
)
def test_bad_python_placeholders_fail_when_loading(tmp_path, user, match):
    config = write(tmp_path, "c.yaml", f"user: {user}\n")
    with pytest.raises(ServegenError, match=match):
        get_prompt(config)


# --- Jinja2 user texts --------------------------------------------------------------------------

JINJA_CONFIG = """\
format: jinja2
system: "{{ persona | default('') }}"
user: |-
  Answer using the context.
  {% for doc in documents %}
  [{{ loop.index }}] {{ doc.title }}: {{ doc.text }}
  {% endfor %}
  Question: {{ question }}{% if choices %} Choices: {{ choices | join(', ') }}{% endif %}
"""


def test_jinja2_user_text_reads_extra_row_fields(tmp_path):
    prompt = get_prompt(write(tmp_path, "rag.yaml", JINJA_CONFIG), "chatml")
    row = {
        "question": "Which is larger?",
        "documents": [{"title": "A", "text": "ten"}, {"title": "B", "text": "twelve"}],
        "choices": ["A", "B"],
    }
    assert prompt.build_messages(row, drop_empty_system=True) == [
        {
            "role": "user",
            "content": "Answer using the context.\n[1] A: ten\n[2] B: twelve\nQuestion: Which is larger? Choices: A, B",
        }
    ]
    assert prompt.build_string({**row, "persona": "You are exact.", "choices": []}).startswith(
        "<|im_start|>system\nYou are exact.<|im_end|>\n<|im_start|>user\nAnswer using the context.\n[1] A: ten\n"
    )


def test_jinja2_missing_field_names_the_field(tmp_path):
    prompt = get_prompt(write(tmp_path, "rag.yaml", JINJA_CONFIG))
    with pytest.raises(ServegenError, match=r"rag\.yaml key 'user' needs field 'documents', which the row does not have"):
        prompt.build_messages({"question": "Q", "choices": []})


def test_jinja2_syntax_error_names_file_and_line(tmp_path):
    config = write(tmp_path, "bad.yaml", 'format: jinja2\nuser: "line one\\n{% if x %}never closed"\n')
    with pytest.raises(ServegenError, match=r"bad\.yaml key 'user': Jinja2 syntax error on line 2"):
        get_prompt(config)


def test_python_format_leaves_jinja_syntax_alone(tmp_path):
    config = write(tmp_path, "c.yaml", 'user: "{{% raw %}} {question}"\n')
    assert get_prompt(config).build_messages({"question": "Q"})[-1]["content"] == "{% raw %} Q"


# --- few-shot examples --------------------------------------------------------------------------

FEW_SHOT_CONFIG = """\
few_shot_examples:
  prefix: "Examples:\\n"
  template: "Q: {q}\\nA: {a}\\n"
  suffix: "Now:\\n"
  examples_type: null
user: "{examples}Q: {q}"
"""


def test_few_shot_examples_fill_the_examples_placeholder(tmp_path):
    sets = write(tmp_path, "sets.yaml", "- {q: '1 + 1', a: '2'}\n- {q: '2 + 3', a: '5'}\n")
    prompt = get_prompt(write(tmp_path, "c.yaml", FEW_SHOT_CONFIG), examples_type=sets)
    assert prompt.build_messages({"q": "4 + 4"})[-1]["content"] == "Examples:\nQ: 1 + 1\nA: 2\nQ: 2 + 3\nA: 5\nNow:\nQ: 4 + 4"


def test_few_shot_without_examples_type_writes_nothing(tmp_path):
    prompt = get_prompt(write(tmp_path, "c.yaml", FEW_SHOT_CONFIG))
    assert prompt.build_messages({"q": "4 + 4"})[-1]["content"] == "Q: 4 + 4"


def test_few_shot_examples_go_into_the_first_turn_only(tmp_path):
    sets = write(tmp_path, "sets.yaml", "- {q: '1 + 1', a: '2'}\n")
    prompt = get_prompt(write(tmp_path, "c.yaml", FEW_SHOT_CONFIG), examples_type=sets)
    messages = prompt.build_messages([{"q": "2 + 2", "assistant": "4"}, {"q": "3 + 3"}])
    assert [m["content"] for m in messages] == ["", "Examples:\nQ: 1 + 1\nA: 2\nNow:\nQ: 2 + 2", "4", "Q: 3 + 3"]


def test_packaged_math_config_with_registered_examples():
    prompt = get_prompt("generic/math", examples_type="math_arithmetic")
    content = prompt.build_messages({"problem": "What is 6 times 7?"})[-1]["content"]
    assert content.startswith("Solve the following math problem.")
    assert "inside \\boxed{}." in content
    assert content.count("Problem:\n") == len(load_examples("math_arithmetic")) == 3
    assert content.endswith("Now solve this problem.\n\nWhat is 6 times 7?")


def test_examples_type_in_the_config_is_used_and_can_be_overridden(tmp_path):
    sets = write(tmp_path, "sets.yaml", "- {q: '1 + 1', a: '2'}\n")
    config = write(tmp_path, "c.yaml", FEW_SHOT_CONFIG.replace("examples_type: null", f"examples_type: {sets}"))
    assert "Q: 1 + 1" in get_prompt(config).build_messages({"q": "x"})[-1]["content"]
    # the override is used: its examples lack this config's fields, found as soon as it loads
    with pytest.raises(ServegenError, match=r"needs field 'q', which example 1 of math_arithmetic does not have"):
        get_prompt(config, examples_type="math_arithmetic")


def test_unknown_examples_type_lists_the_known_sets(tmp_path):
    with pytest.raises(ServegenError, match=r"unknown few-shot examples 'nope'.*known sets are math_arithmetic, math_word_problems"):
        get_prompt("generic/math", examples_type="nope")


def test_examples_type_needs_a_config_with_few_shot_examples():
    with pytest.raises(ServegenError, match=r"generic/default\.yaml has no few_shot_examples"):
        get_prompt("generic/default", examples_type="math_arithmetic")


def test_few_shot_config_needs_the_examples_placeholder(tmp_path):
    config = write(tmp_path, "c.yaml", FEW_SHOT_CONFIG.replace('user: "{examples}Q: {q}"', 'user: "Q: {q}"'))
    with pytest.raises(ServegenError, match=r"needs an \{examples\} placeholder"):
        get_prompt(config)


def test_row_cannot_bring_its_own_examples_field(tmp_path):
    prompt = get_prompt(write(tmp_path, "c.yaml", FEW_SHOT_CONFIG))
    with pytest.raises(ServegenError, match=r"has a field 'examples', which prompt config .* fills with its few-shot examples"):
        prompt.build_messages({"q": "x", "examples": "mine"})


def test_example_files_must_hold_lists_of_mappings(tmp_path):
    with pytest.raises(ServegenError, match=r"expected a non-empty list of examples"):
        load_examples(write(tmp_path, "bad.yaml", "q: 1\n"))


# --- finding configs and templates --------------------------------------------------------------


def test_unknown_config_lists_where_it_looked():
    with pytest.raises(ServegenError) as error:
        get_prompt("generic/nope")
    message = str(error.value)
    assert f"unknown prompt config 'generic/nope': looked at {PACKAGE_DIR}/config/generic/nope.yaml" in message
    assert "the known ones are generic/default, generic/math" in message


def test_unknown_config_path():
    with pytest.raises(ServegenError, match=r"unknown prompt config '/no/such\.yaml': looked at /no/such\.yaml"):
        get_prompt("/no/such.yaml")


def test_unknown_template_lists_where_it_looked():
    with pytest.raises(ServegenError) as error:
        get_prompt("generic/default", "llama9")
    message = str(error.value)
    assert f"looked at {PACKAGE_DIR}/template/llama9.yaml, a model folder llama9" in message
    assert "chatml, deepseek, gemma, llama2-chat, llama3-instruct, mistral, phi3, qwen" in message


def test_config_and_template_dirs_and_paths(tmp_path):
    (tmp_path / "configs" / "team").mkdir(parents=True)
    (tmp_path / "templates").mkdir()
    write(tmp_path / "configs" / "team", "ask.yaml", 'user: "Q: {question}"\n')
    template = "text_begin: '<'\nsystem_begin: ''\nsystem_end: ''\nuser_begin: '['\nuser_end: ']'\n"
    template += "assistant_begin: '('\nassistant_end: ')'\nstop_phrases: [')']\n"
    write(tmp_path / "templates", "tiny.yaml", template)
    prompt = get_prompt("team/ask", "tiny", config_dir=tmp_path / "configs", template_dir=tmp_path / "templates")
    assert prompt.build_string({"question": "x"}) == "<[Q: x]("
    assert prompt.stop_phrases == [")"]
    by_path = get_prompt(str(tmp_path / "configs/team/ask.yaml"), str(tmp_path / "templates/tiny.yaml"))
    assert by_path.build_string([{"question": "a", "assistant": "b"}, {"question": "c"}]) == "<[Q: a](b)[Q: c]("


@pytest.mark.parametrize(
    "text, match",
    [
        ("user: '{question}'\nsystm: ''\n", r"c\.yaml: unknown key 'systm' \(known keys: system, user, format, few_shot_examples\)"),
        ("system: ''\n", r"c\.yaml: missing key 'user'"),
        ("user: [a]\n", r"c\.yaml: key 'user' must be a string, got list"),
        ("user: '{q}'\nformat: jinja\n", r"key 'format' must be one of python, jinja2"),
        ("user: '{q}\n", r"c\.yaml line \d+: not valid YAML"),
        ("- user\n", r"c\.yaml: expected a mapping of keys, got list"),
        ("user: '{q}'\nfew_shot_examples: {prefix: x}\n", r"key 'few_shot_examples': missing key 'template'"),
    ],
)
def test_config_file_errors_name_file_and_key(tmp_path, text, match):
    with pytest.raises(ServegenError, match=match):
        get_prompt(write(tmp_path, "c.yaml", text))


GOOD_TEMPLATE = {
    "text_begin": "''",
    "system_begin": "''",
    "system_end": "''",
    "user_begin": "''",
    "user_end": "''",
    "assistant_begin": "''",
    "assistant_end": "''",
    "stop_phrases": "['x']",
}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"user_end": None}, r"t\.yaml: missing key 'user_end'"),
        ({"stop_phrases": "['']"}, r"key 'stop_phrases' must be a list of non-empty strings"),
        ({"system_placement": "last_user"}, r"key 'system_placement' takes block, first_user; got 'last_user'"),
        ({"empty_system": "keep"}, r"key 'empty_system' takes omit, block; got 'keep'"),
        ({"trim": "[everything]"}, r"key 'trim' takes system, user, user_turn, assistant; got 'everything'"),
        ({"bos": "'<s>'"}, r"t\.yaml: unknown key 'bos'"),
    ],
)
def test_template_file_errors_name_file_and_key(tmp_path, change, match):
    keys = {**GOOD_TEMPLATE, **change}
    path = write(tmp_path, "t.yaml", "".join(f"{k}: {v}\n" for k, v in keys.items() if v is not None))
    with pytest.raises(ServegenError, match=match):
        get_prompt("generic/default", path)


# --- template options ---------------------------------------------------------------------------


def test_template_options(tmp_path, config_dir):
    keys = {**GOOD_TEMPLATE, "system_begin": "'S:'", "system_end": "'|'", "user_begin": "'U:'", "user_end": "'|'"}
    keys |= {"assistant_begin": "'A:'", "assistant_end": "'|'", "generation_begin": "'>'"}

    def build(extra, data):
        path = write(tmp_path, "t.yaml", "".join(f"{k}: {v}\n" for k, v in {**keys, **extra}.items()))
        return get_prompt("chat", path, config_dir=config_dir).build_string(data)

    row = {"system": " sys ", "question": " q "}
    assert build({}, row) == "S: sys |U: q |>"
    assert build({}, {**row, "system": ""}) == "U: q |>"
    assert build({"empty_system": "block"}, {**row, "system": ""}) == "S:|U: q |>"
    assert build({"default_system": "'def'"}, {**row, "system": ""}) == "S:def|U: q |>"
    assert build({"system_placement": "first_user"}, row) == "U:S: sys | q |>"
    assert build({"trim": "[system, user]"}, row) == "S:sys|U:q|>"
    assert build({"system_placement": "first_user", "trim": "[user_turn]"}, row) == "U:S: sys | q|>"
    turns = [{"system": "", "question": "a", "assistant": " r "}, {"question": "b"}]
    assert build({"trim": "[assistant]"}, turns) == "U:a|A:r|U:b|>"
    assert build({}, turns) == "U:a|A: r |U:b|>"


# --- packaging ----------------------------------------------------------------------------------


def test_prompt_yaml_files_ship_in_the_package():
    """pyproject's package-data ships *.yaml of each package: every folder holding prompt YAML
    must be a package, or an installed servegen would have no configs."""
    root = PACKAGE_DIR.parents[1]
    packages = set(setuptools.find_packages(str(root), include=["servegen*"]))
    yaml_files = list(PACKAGE_DIR.rglob("*.yaml"))
    assert len(yaml_files) >= 11
    for path in yaml_files:
        package = ".".join(path.parent.relative_to(root).parts)
        assert package in packages, f"{path.parent} is not a package, so {path.name} would not be installed"
