"""Prompt templates: how a model family spells a conversation with its special tokens. Either a
YAML file of text pieces (servegen/prompt/template/*.yaml) or a model folder's own chat template."""

from dataclasses import dataclass
from pathlib import Path

from servegen.errors import ServegenError
from servegen.prompt.conversation import Conversation
from servegen.prompt.loading import PACKAGE_DIR, candidates, not_found, read_mapping
from servegen.prompt.model_template import ModelChatTemplate

TEMPLATE_DIR = PACKAGE_DIR / "template"

_PIECES = ("text_begin", "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end")
_KEYS = {
    **{key: str for key in _PIECES},
    "stop_phrases": list,
    "generation_begin": str,
    "system_placement": str,
    "empty_system": str,
    "default_system": str,
    "trim": list,
}
PLACEMENTS = ("block", "first_user")
EMPTY_SYSTEM = ("omit", "block")
TRIMMABLE = ("system", "user", "user_turn", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """A template given as text pieces (docs/prompts.md, "Templates")."""

    source: Path
    text_begin: str
    system_begin: str
    system_end: str
    user_begin: str
    user_end: str
    assistant_begin: str
    assistant_end: str
    stop_phrases: tuple[str, ...]
    generation_begin: str  # opens the reply the model writes; assistant_begin unless set
    system_placement: str  # "block": its own block; "first_user": inside the first user turn
    empty_system: str  # "omit": no system block for an empty system; "block": an empty block
    default_system: str  # the system text used when the prompt's is empty
    trim: frozenset[str]  # which texts are stripped of surrounding whitespace

    def render(self, conversation: Conversation) -> str:
        system = conversation.system or self.default_system
        if "system" in self.trim:
            system = system.strip()
        with_system = bool(system) or self.empty_system == "block"
        system_text = self.system_begin + system + self.system_end if with_system else ""
        parts = [self.text_begin]
        if self.system_placement == "block":
            parts.append(system_text)
        for i, turn in enumerate(conversation.turns):
            user = turn.user.strip() if "user" in self.trim else turn.user
            if i == 0 and self.system_placement == "first_user":
                user = system_text + user
            if "user_turn" in self.trim:
                user = user.strip()
            parts += [self.user_begin, user, self.user_end]
            if turn.assistant is not None:
                assistant = turn.assistant.strip() if "assistant" in self.trim else turn.assistant
                parts += [self.assistant_begin, assistant, self.assistant_end]
        parts.append(self.generation_begin)
        return "".join(parts)


def load_template(name: str, template_dir: str | Path | None = None) -> "ChatFormat | ModelChatTemplate":
    """`name` is a short name under `template_dir` (default: servegen's own templates), e.g.
    `llama3-instruct`, a path to a YAML file, or a model folder whose chat template to use."""
    folder = Path(template_dir) if template_dir is not None else TEMPLATE_DIR
    looked = candidates(name, folder)
    path = next((p for p in looked if p.is_file()), None)
    if path is not None:
        return _load_chat_format(path)
    model_dir = Path(name).expanduser()
    if model_dir.is_dir():
        return ModelChatTemplate(model_dir)
    raise not_found("prompt template", name, [*looked, f"a model folder {model_dir}"], folder)


def _load_chat_format(path: Path) -> ChatFormat:
    data = read_mapping(path, _KEYS, required=(*_PIECES, "stop_phrases"))
    stop_phrases = data["stop_phrases"]
    if not all(isinstance(s, str) and s for s in stop_phrases):
        raise ServegenError(f"{path}: key 'stop_phrases' must be a list of non-empty strings")
    trim = data.get("trim") or []
    for key, value, allowed in (
        ("system_placement", data.get("system_placement") or "block", PLACEMENTS),
        ("empty_system", data.get("empty_system") or "omit", EMPTY_SYSTEM),
        *(("trim", item, TRIMMABLE) for item in trim),
    ):
        if value not in allowed:
            raise ServegenError(f"{path}: key {key!r} takes {', '.join(allowed)}; got {value!r}")
    return ChatFormat(
        source=path,
        **{key: data[key] for key in _PIECES},
        stop_phrases=tuple(stop_phrases),
        generation_begin=data["assistant_begin"] if data.get("generation_begin") is None else data["generation_begin"],
        system_placement=data.get("system_placement") or "block",
        empty_system=data.get("empty_system") or "omit",
        default_system=data.get("default_system") or "",
        trim=frozenset(trim),
    )
