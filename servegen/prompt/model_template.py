"""A model folder's own chat template, rendered the way transformers' `apply_chat_template` renders
it, so that any local model's prompt string is the one its tokenizer would build.

Where the template comes from, first found wins (as transformers 5 loads a folder):
chat_template.jinja, tokenizer_config.json `chat_template`, chat_template.json `chat_template`.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from servegen.errors import ServegenError
from servegen.prompt.conversation import Conversation

# transformers passes these to every chat template (its `special_tokens_map`)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    keeps its body, in a scope of its own as in transformers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


class ModelChatTemplate:
    def __init__(self, folder: Path):
        self.folder = folder
        self.source = folder  # for messages: the file the template came from
        config = _read_json(folder / "tokenizer_config.json")
        self.text = self._template_text(config)
        self.special_tokens = _special_tokens(folder, config)
        self.stop_phrases = _stop_phrases(folder, config, self.special_tokens.get("eos_token"))
        try:
            self._template = _ENV.from_string(self.text)
        except jinja2.TemplateSyntaxError as e:
            raise ServegenError(f"{self.source}: chat template syntax error on line {e.lineno}: {e.message}") from e

    def render(self, conversation: Conversation) -> str:
        try:
            return self._template.render(
                messages=conversation.messages(),
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ServegenError(f"the chat template of {self.folder} refused the conversation: {e}") from None

    def _template_text(self, config: dict) -> str:
        jinja_file = self.folder / "chat_template.jinja"
        if jinja_file.is_file():
            self.source = jinja_file
            return jinja_file.read_text(encoding="utf-8")
        for name, data in (
            ("tokenizer_config.json", config),
            ("chat_template.json", _read_json(self.folder / "chat_template.json")),
        ):
            template = data.get("chat_template")
            if template is None:
                continue
            self.source = self.folder / name
            if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
                template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
            if not isinstance(template, str):
                raise ServegenError(
                    f"{self.source}: 'chat_template' is neither a template string nor a list with a 'default' one"
                )
            return template
        raise ServegenError(
            f"{self.folder} has no chat template: "
            "none in chat_template.jinja, tokenizer_config.json or chat_template.json"
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ServegenError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ServegenError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """A token as tokenizer files write it: a string, or an AddedToken mapping with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(folder: Path, config: dict) -> dict[str, str]:
    # special_tokens_map.json is the older place; tokenizer_config.json wins where both say.
    legacy = _read_json(folder / "special_tokens_map.json")
    tokens = {}
    for key in SPECIAL_TOKENS:
        text = _token_text(config.get(key))
        if text is None:
            text = _token_text(legacy.get(key))
        if text is not None:
            tokens[key] = text
    return tokens


def _stop_phrases(folder: Path, config: dict, eos_token: str | None) -> tuple[str, ...]:
    """The eos token, then generation_config.json's eos_token_id tokens (e.g. Llama 3's <|eot_id|>)."""
    phrases = [eos_token] if eos_token else []
    ids = _read_json(folder / "generation_config.json").get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
    if ids:
        names = {int(i): _token_text(t) for i, t in (config.get("added_tokens_decoder") or {}).items()}
        if not all(names.get(i) for i in ids):
            tokenizer = _read_json(folder / "tokenizer.json")
            names.update({t.get("id"): t.get("content") for t in tokenizer.get("added_tokens") or []})
        phrases += [names[i] for i in ids if names.get(i)]
    return tuple(dict.fromkeys(phrases))
