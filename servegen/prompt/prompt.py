"""A prompt config joined with a template: data rows in, prompt strings or chat messages out."""

from pathlib import Path

from servegen.errors import ServegenError
from servegen.prompt.chat_format import ChatFormat, load_template
from servegen.prompt.conversation import Conversation, Turn
from servegen.prompt.model_template import ModelChatTemplate
from servegen.prompt.prompt_config import EXAMPLES_FIELD, PromptConfig, load_config, load_examples

ASSISTANT_FIELD = "assistant"  # in a multi-turn list, the reply already given to that turn


class Prompt:
    """Build with `get_prompt`. `data` is one row (a dict of fields: a single-turn conversation) or
    a list of turns, each a dict of fields; every turn but the last holds its reply in `assistant`."""

    def __init__(
        self,
        config: PromptConfig,
        template: ChatFormat | ModelChatTemplate | None,
        examples_type: str | None = None,
        examples: list[dict] | None = None,
    ):
        self.config = config
        self.template = template
        self.examples_type = examples_type
        self.examples = examples
        self._examples_text = self._render_examples() if config.few_shot is not None else None

    def __repr__(self) -> str:
        template = self.template.source if self.template is not None else None
        return f"Prompt(config={str(self.config.source)!r}, template={str(template)!r})"

    @property
    def stop_phrases(self) -> list[str]:
        """Where the model's reply ends, from the template; [] without one."""
        return list(self.template.stop_phrases) if self.template is not None else []

    def build_messages(self, data: dict | list[dict], drop_empty_system: bool = False) -> list[dict]:
        """Chat messages for /v1/chat/completions: the server's own chat template spells them. The
        system message comes first even when empty, as NeMo-Skills prints it; drop_empty_system=True
        leaves an empty one out, as a generation job sends them (a template like Gemma 2's refuses
        any system message) and as a model folder's template renders them."""
        return self.conversation(data).messages(drop_empty_system)

    def build_string(self, data: dict | list[dict]) -> str:
        """The whole prompt string with every special token, for /v1/completions, ending where
        the model's reply begins."""
        if self.template is None:
            raise ServegenError(
                f"prompt config {self.config.source} has no template, so it cannot build a prompt string: "
                "pass a template (e.g. llama3-instruct, or a model folder), or send build_messages() to a chat endpoint"
            )
        return self.template.render(self.conversation(data))

    def conversation(self, data: dict | list[dict]) -> Conversation:
        if isinstance(data, dict):
            rows, multi_turn = [data], False
        elif isinstance(data, list) and data:
            rows, multi_turn = data, True
        else:
            raise ServegenError(
                f"prompt data must be a dict of fields or a non-empty list of turns (dicts), got {data!r:.80}"
            )
        turns = []
        for i, row in enumerate(rows):
            where = f"turn {i + 1}" if multi_turn else "the row"
            if not isinstance(row, dict):
                raise ServegenError(f"prompt data {where} must be a dict of fields, got {type(row).__name__}")
            last = i == len(rows) - 1
            assistant = None
            if multi_turn:
                assistant = row.get(ASSISTANT_FIELD)
                if last and assistant is not None:
                    raise ServegenError(
                        f"prompt data: the last turn ({where}) is the one the model answers, "
                        f"so it cannot have an {ASSISTANT_FIELD!r} field"
                    )
                if not last and not isinstance(assistant, str):
                    raise ServegenError(f"prompt data {where} needs its reply as a string in field {ASSISTANT_FIELD!r}")
            fields = self._fields(row, first=i == 0, where=where)
            if i == 0:
                system = self.config.system.render(fields, where)
            turns.append(Turn(self.config.user.render(fields, where), assistant))
        return Conversation(system, tuple(turns))

    def _fields(self, row: dict, first: bool, where: str) -> dict:
        if self._examples_text is None:
            return row
        if EXAMPLES_FIELD in row:
            raise ServegenError(
                f"prompt data {where} has a field {EXAMPLES_FIELD!r}, which prompt config {self.config.source} "
                "fills with its few-shot examples"
            )
        # the examples go into the first turn only; later turns would repeat them
        return {**row, EXAMPLES_FIELD: self._examples_text if first else ""}

    def _render_examples(self) -> str:
        if not self.examples:
            return ""
        few_shot = self.config.few_shot
        filled = [
            few_shot.template.render(example, f"example {i + 1} of {self.examples_type}")
            for i, example in enumerate(self.examples)
        ]
        return few_shot.prefix + "".join(filled) + few_shot.suffix


def get_prompt(
    prompt_config: str,
    prompt_template: str | None = None,
    examples_type: str | None = None,
    config_dir: str | Path | None = None,
    template_dir: str | Path | None = None,
) -> Prompt:
    """`prompt_config`: a short name (`generic/default`) or a YAML path. `prompt_template`: a short
    name (`llama3-instruct`), a YAML path, or a model folder; None for chat endpoints only.
    `examples_type` picks the few-shot example set, over the config's own `examples_type`."""
    config = load_config(prompt_config, config_dir)
    template = load_template(prompt_template, template_dir) if prompt_template is not None else None
    if examples_type is not None and config.few_shot is None:
        raise ServegenError(
            f"examples_type {examples_type!r} was given, but prompt config {config.source} "
            "has no few_shot_examples to put them in"
        )
    if config.few_shot is not None:
        examples_type = examples_type or config.few_shot.examples_type
    examples = load_examples(examples_type) if examples_type is not None else None
    return Prompt(config, template, examples_type, examples)
