"""One piece of prompt text with placeholders for a row's fields: Python `{field}` syntax, or a
Jinja2 template when the prompt config says `format: jinja2`."""

import re
import string

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from servegen.errors import ServegenError

FORMATS = ("python", "jinja2")

# Block tags on their own lines leave no blank lines behind; a missing field is an error, never "".
_JINJA = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
)
_UNDEFINED = re.compile(r"'([^']+)' is undefined")


class Text:
    """`where` names the text in messages, e.g. "prompt config generic/math.yaml key 'user'"."""

    def __init__(self, text: str, fmt: str, where: str):
        self.text = text
        self.where = where
        self.fmt = fmt
        if fmt == "jinja2":
            try:
                self._jinja = _JINJA.from_string(text)
                self.fields = frozenset(jinja2.meta.find_undeclared_variables(_JINJA.parse(text)))
            except jinja2.TemplateSyntaxError as e:
                raise ServegenError(f"{where}: Jinja2 syntax error on line {e.lineno}: {e.message}") from e
        else:
            try:
                names = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
            except ValueError as e:
                raise ServegenError(f"{where}: {e}; write {{{{ and }}}} for literal braces") from e
            if "" in names or any(name[0].isdigit() for name in names if name):
                raise ServegenError(f"{where}: every placeholder needs a field name, e.g. {{question}}")
            # {a.b} and {a[0]} read field a
            self.fields = frozenset(re.split(r"[.\[]", name, maxsplit=1)[0] for name in names)

    def render(self, values: dict, source: str) -> str:
        """`source` names where the values came from ("the row", "turn 2", "example 3 of math_simple")."""
        try:
            if self.fmt == "jinja2":
                return self._jinja.render(values)
            return self.text.format_map(values)
        except KeyError as e:
            raise self._missing(e.args[0], values, source) from None
        except jinja2.UndefinedError as e:
            match = _UNDEFINED.fullmatch(str(e.message))
            if match:
                raise self._missing(match.group(1), values, source) from None
            raise ServegenError(f"{self.where}: {e.message} (in {source})") from None
        except (jinja2.TemplateError, AttributeError, IndexError, TypeError, ValueError) as e:
            raise ServegenError(f"{self.where}: cannot fill it from {source}: {e}") from None

    def _missing(self, field: str, values: dict, source: str) -> ServegenError:
        have = ", ".join(sorted(values)) or "none"
        return ServegenError(f"{self.where} needs field {field!r}, which {source} does not have (its fields: {have})")
