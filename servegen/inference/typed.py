"""Typed outputs: what the caller asked for (`output_type=` or `json_schema=`) as one JSON schema,
sent to servers that constrain decoding to it, and a strict parser that every generation passes
through on every server type, constrained or not.

- `output_type={"age": "int", "units": "str"}`: field types str, int, float, bool and list[...]
  of them (strings, or the Python types themselves). Every field is required and no other
  field is allowed. The output is a dict; int fields hold ints (a JSON 3.0 becomes 3).
- `json_schema=` a dict (a JSON schema): the output is the parsed JSON value, validated with
  jsonschema.
- `json_schema=` a pydantic model class: the output is an instance of that class
  (`Model.model_validate`), so pydantic's own rules decide what is valid.
"""

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from servegen.errors import ServegenError

_SCALARS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_PY_TYPES = {str: "str", int: "int", float: "float", bool: "bool"}
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True, eq=False)
class OutputSpec:
    schema: dict
    name: str  # for response_format's json_schema.name
    model_class: type | None = None  # pydantic: the output is an instance
    int_fields: tuple[str, ...] = ()  # output_type fields to turn 3.0 into 3
    validator: Any = None  # jsonschema validator (dict schemas and output_type)

    def parse(self, text: str) -> Any:
        """The generation as the typed value; ValueError says why it is not one."""
        stripped = text.strip()
        fenced = _FENCE.match(stripped)  # models without constrained decoding like ```json fences
        if fenced:
            stripped = fenced.group(1).strip()
        try:
            value = json.loads(stripped)
        except ValueError as e:
            raise ValueError(f"not JSON ({e}): {_snippet(text)}") from None
        if self.model_class is not None:
            import pydantic

            try:
                return self.model_class.model_validate(value)
            except pydantic.ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "value"
                raise ValueError(f"{where}: {first['msg']}: {_snippet(text)}") from None
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "value"
            raise ValueError(f"{where}: {error.message}: {_snippet(text)}")
        for name in self.int_fields:
            field = value[name]
            value[name] = int(field) if not isinstance(field, list) else [int(x) for x in field]
        return value


def _snippet(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def output_spec(output_type: Any = None, json_schema: Any = None) -> OutputSpec | None:
    """The spec for one prompt's typed output, or None for plain text. Raises ServegenError for a
    spec that cannot be used."""
    if output_type is None and json_schema is None:
        return None
    if output_type is not None and json_schema is not None:
        raise ServegenError("pass output_type= or json_schema=, not both")
    if output_type is not None:
        if not isinstance(output_type, dict) or not output_type:
            raise ServegenError(f'output_type must be a dict of field -> type, e.g. {{"age": "int"}}; got {output_type!r}')
        key = tuple((str(k), _type_name(k, v)) for k, v in output_type.items())
        return _from_output_type(key)
    if isinstance(json_schema, dict):
        return _from_schema(json.dumps(json_schema, sort_keys=True))
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        return _from_model(json_schema)
    raise ServegenError(f"json_schema must be a dict (a JSON schema) or a pydantic model class; got {json_schema!r}")


def _type_name(field: Any, t: Any) -> str:
    """A field type as one of the names output_type accepts: "int", "list[str]", ..."""
    if t in _PY_TYPES:
        return _PY_TYPES[t]
    if getattr(t, "__origin__", None) is list and len(t.__args__) == 1 and t.__args__[0] in _PY_TYPES:
        return f"list[{_PY_TYPES[t.__args__[0]]}]"
    if isinstance(t, str):
        name = t.replace(" ", "")
        inner = name[5:-1] if name.startswith("list[") and name.endswith("]") else name
        if inner in _SCALARS:
            return name
    raise ServegenError(
        f"output_type field {field!r} has type {t!r}; use str, int, float, bool or list[...] of one of them"
    )


@functools.lru_cache(maxsize=256)
def _from_output_type(fields: tuple[tuple[str, str], ...]) -> OutputSpec:
    properties = {}
    for name, t in fields:
        if t.startswith("list["):
            properties[name] = {"type": "array", "items": {"type": _SCALARS[t[5:-1]]}}
        else:
            properties[name] = {"type": _SCALARS[t]}
    schema = {
        "type": "object",
        "properties": properties,
        "required": [name for name, _ in fields],
        "additionalProperties": False,
    }
    ints = tuple(name for name, t in fields if t in ("int", "list[int]"))
    return OutputSpec(schema, "output", int_fields=ints, validator=_validator(schema))


@functools.lru_cache(maxsize=256)
def _from_schema(canonical: str) -> OutputSpec:
    schema = json.loads(canonical)
    return OutputSpec(schema, _name(schema.get("title")), validator=_validator(schema))


@functools.lru_cache(maxsize=256)
def _from_model(model_class: type) -> OutputSpec:
    return OutputSpec(model_class.model_json_schema(), _name(model_class.__name__), model_class=model_class)


def _name(title: Any) -> str:
    """A response_format name as OpenAI accepts it: [a-zA-Z0-9_-], at most 64 characters."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", str(title or "output"))[:64]


def _validator(schema: dict):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ServegenError(f"json_schema is not a valid JSON schema: {e.message}") from None
    return cls(schema)
