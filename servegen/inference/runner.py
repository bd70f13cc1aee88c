"""`Runner`: the shortest way from a script to a model server.

    runner = Runner(server_type="vllm", port=8000)
    runner.call("How are you?")                       # -> str
    runner.call(["What's 2 + 2?", "What's 3 + 3?"])   # -> list[str]
    runner.call("What's 2 + 2?", output_type={"answer": "int"})  # -> {"answer": 4}

Prompts come from servegen.prompt: `get_prompt(prompt_config, template)` (prompt_config
default generic/default: no system text, the question as the user turn). An input is a string
(the `question` field) or a dict of the prompt config's fields. system_prompt, when given,
replaces the config's system text. Without a template, each input becomes chat messages for
/v1/chat/completions (the server applies the model's chat template); with template= (e.g.
"llama3-instruct", or a model folder) it becomes the exact prompt string, special tokens and
all, for /v1/completions, and the template's stop phrases are used unless stop_phrases= is
given.
"""

import dataclasses
from typing import Any


class Runner:
    def __init__(
        self,
        server_type: str = "vllm",
        system_prompt: str | None = None,
        template: str | None = None,
        prompt_config: str = "generic/default",
        **get_model_kwargs: Any,
    ):
        from servegen.inference import get_model
        from servegen.prompt import get_prompt

        self._prompt = get_prompt(prompt_config, prompt_template=template)
        self.llm = get_model(server_type, **get_model_kwargs)
        self.system_prompt = system_prompt
        self.template = template

    def __repr__(self) -> str:
        return f"Runner({self.llm!r}, template={self.template!r})"

    def call(self, inputs: Any, output_type: dict | None = None, json_schema: Any = None, **generate_kwargs: Any) -> Any:
        """A string (or dict of fields) gives one result, a list gives a list. The result is the
        generation text, or with output_type / json_schema the typed output."""
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else list(inputs)
        prompts = [self._build(item) for item in items]
        if self.template is not None and "stop_phrases" not in generate_kwargs and self._prompt.stop_phrases:
            generate_kwargs["stop_phrases"] = list(self._prompt.stop_phrases)
        rows = self.llm.generate(prompts, output_type=output_type, json_schema=json_schema, **generate_kwargs)
        key = "generation" if output_type is None and json_schema is None else "output"
        results = [row[key] for row in rows]
        return results[0] if single else results

    def _build(self, item: Any) -> Any:
        conversation = self._prompt.conversation(item if isinstance(item, dict) else {"question": item})
        if self.system_prompt is not None:
            conversation = dataclasses.replace(conversation, system=self.system_prompt)
        if self.template is None:
            return conversation.messages()
        return self._prompt.template.render(conversation)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
