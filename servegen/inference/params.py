"""The parameters of a generate call: each one a scalar for every prompt or a list with one value
per prompt, checked once per call (before anything is sent) into one `Params` per prompt.

Per-prompt lists: a list or tuple, of the prompts' length. Two parameters take lists as their
scalar value, so their per-prompt form is a list of those: `stop_phrases` (a list of strings is
one set of phrases for every prompt; per prompt, pass a list of lists), and `output_type` /
`json_schema` / `extra_body` (a dict or a class is for every prompt; a list of them is per prompt).
"""

from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any

from servegen.errors import ServegenError
from servegen.inference.typed import OutputSpec, output_spec

# temperature and top_p left unset: greedy, the engines' own defaults; with a random_seed,
# NeMo-Skills' sampling for independent answers (its top_k, -1, is the default anyway).
GREEDY = {"temperature": 0.0, "top_p": 1.0}
RANDOM_SEED_SAMPLING = {"temperature": 0.7, "top_p": 0.95}


def _setting(default: Any, rule: str, doc: str, ok, integer: bool = False):
    """A field with its rule in words and as a test (`ok`), and whether it takes integers only."""
    return field(default=default, metadata={"rule": rule, "doc": doc, "ok": ok, "integer": integer})


@dataclass
class Sampling:
    """The sampling parameters, declared once: type, default, rule and meaning. `Client.generate`
    takes them (its signature's defaults are held equal to these by a test), a generation job's
    `inference` config is this plus the client's options, and the docs' tables
    (docs/clients.md, docs/generation.md) are held equal to it."""

    tokens_to_generate: int = _setting(512, "an integer >= 1", "most tokens to generate", lambda x: x >= 1, True)
    temperature: float | None = _setting(
        None, "a number >= 0", "0 is greedy; unset: 0.0, or 0.7 with a random_seed", lambda x: x >= 0)
    top_p: float | None = _setting(
        None, "a number in (0, 1]", "nucleus sampling; unset: 1.0, or 0.95 with a random_seed", lambda x: 0 < x <= 1)
    top_k: int = _setting(
        -1, "-1 or 0 (off) or an integer >= 1", "the k most likely tokens; -1 or 0: off", lambda x: x >= -1, True)
    min_p: float = _setting(
        0.0, "a number in [0, 1]", "tokens less likely than min_p x the most likely one are left out", lambda x: 0 <= x <= 1)
    repetition_penalty: float = _setting(1.0, "a number > 0", "1.0: off", lambda x: x > 0)
    random_seed: int | None = _setting(
        None, "an integer or None", "the request's seed (the same seed, the same sample)", lambda x: True, True)


SAMPLING = {f.name: f for f in fields(Sampling)}


@dataclass(frozen=True, slots=True)
class Params:
    """What one request asks for, checked and normalised (unset sampling resolved)."""

    tokens_to_generate: int = SAMPLING["tokens_to_generate"].default
    temperature: float = GREEDY["temperature"]
    top_p: float = GREEDY["top_p"]
    top_k: int = 0  # off; the declared -1 means the same
    min_p: float = SAMPLING["min_p"].default
    repetition_penalty: float = SAMPLING["repetition_penalty"].default
    random_seed: int | None = None
    stop_phrases: tuple[str, ...] = ()
    remove_stop_phrases: bool = True
    timeout: float | None = None  # None: the client's
    top_logprobs: int | None = None
    spec: OutputSpec | None = None
    extra_body: dict | None = None


NAMES = (
    *SAMPLING, "stop_phrases", "remove_stop_phrases", "timeout", "top_logprobs", "output_type", "json_schema",
    "extra_body",
)  # fmt: skip
_DICT_VALUED = ("output_type", "json_schema", "extra_body")


def _number(name: str, v: Any, ok, rule: str, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, int if integer else Real) or not ok(v):
        raise ServegenError(f"{name} must be {rule}, got {v!r}")
    return v if integer else float(v)


def check(name: str, v: Any) -> Any:
    """One value of one parameter, normalised; ServegenError names the parameter and the rule."""
    if name in SAMPLING:
        if v is None and SAMPLING[name].default is None:
            return None  # unset (resolved per prompt)
        rule = SAMPLING[name].metadata
        v = _number(name, v, rule["ok"], rule["rule"], integer=rule["integer"])
        return max(v, 0) if name == "top_k" else v
    if name == "stop_phrases":
        phrases = (v,) if isinstance(v, str) else tuple(v or ())
        if not all(isinstance(p, str) and p for p in phrases):
            raise ServegenError(f"stop_phrases must be None, a string or a list of non-empty strings, got {v!r}")
        return phrases
    if name == "remove_stop_phrases":
        if not isinstance(v, bool):
            raise ServegenError(f"remove_stop_phrases must be True or False, got {v!r}")
        return v
    if name == "timeout":
        return None if v is None else _number(name, v, lambda x: x > 0, "a number of seconds > 0 or None")
    if name == "top_logprobs":
        return None if v is None else _number(name, v, lambda x: x >= 0, "None or an integer >= 0", integer=True)
    if name == "extra_body":
        if v is not None and not isinstance(v, dict):
            raise ServegenError(f"extra_body must be a dict of extra request fields or None, got {v!r}")
        return v
    if name in ("output_type", "json_schema"):
        return v  # output_spec checks the pair
    raise ServegenError(f"unknown generation parameter {name!r}; known: {', '.join(NAMES)}")


def _per_prompt(name: str, v: Any) -> bool:
    if not isinstance(v, (list, tuple)):
        return False
    if name == "stop_phrases":
        nested = [isinstance(x, (list, tuple)) or x is None for x in v]
        if any(nested) and not all(nested):
            raise ServegenError(
                "stop_phrases mixes strings and lists: pass one list of strings for every prompt, "
                "or one list (or None) per prompt"
            )
        return bool(v) and all(nested)
    return True


class Plan:
    """The parameters of one call. `n` prompts, or None for an iterator of unknown length (then
    per-prompt values come with each item, see `for_item`)."""

    def __init__(self, n: int | None, values: dict[str, Any]):
        self.scalars: dict[str, Any] = {}
        self.lists: dict[str, list] = {}
        for name, v in values.items():
            if _per_prompt(name, v):
                if n is None:
                    raise ServegenError(
                        f"{name} is a list, but the prompts are an iterator: give per-prompt values in each "
                        f'item instead, e.g. {{"prompt": ..., "{name}": ...}}'
                    )
                if len(v) != n:
                    raise ServegenError(f"{name} has {len(v)} values for {n} prompts; give one value per prompt or a scalar")
                self.lists[name] = [self._check(name, x, i) for i, x in enumerate(v)]
            else:
                self.scalars[name] = check(name, v)
        self.shared = None if self.lists else self._make(self.scalars)

    @staticmethod
    def _check(name: str, v: Any, i: int) -> Any:
        try:
            return check(name, v)
        except ServegenError as e:
            raise ServegenError(f"{name}[{i}]: {e}") from None

    def params(self, i: int) -> Params:
        if self.shared is not None:
            return self.shared
        values = dict(self.scalars)
        for name, per_prompt in self.lists.items():
            values[name] = per_prompt[i]
        try:
            return self._make(values)
        except ServegenError as e:
            raise ServegenError(f"prompt {i}: {e}") from None

    def for_item(self, item: Any) -> tuple[Any, Params]:
        """An iterator item: a prompt, or a dict {"prompt": ..., <parameter>: <value>, ...}."""
        if not isinstance(item, dict):
            return item, self.shared
        if "prompt" not in item:
            raise ServegenError(f'an item given as a dict needs a "prompt" key, got keys {sorted(item)}')
        values = dict(self.scalars)
        for name, v in item.items():
            if name != "prompt":
                values[name] = check(name, v)
        return item["prompt"], self._make(values)

    @staticmethod
    def _make(values: dict[str, Any]) -> Params:
        values = dict(values)
        spec = output_spec(values.pop("output_type", None), values.pop("json_schema", None))
        unset = RANDOM_SEED_SAMPLING if values.get("random_seed") is not None else GREEDY
        for name, default in unset.items():
            if values.get(name) is None:
                values[name] = default
        return Params(spec=spec, **values)
