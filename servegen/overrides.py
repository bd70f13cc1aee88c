"""Hydra's override grammar, both ways: `key=v`, `+key=v`, `++key=v` read as Hydra reads them,
and values written so that Hydra reads them back unchanged (job command lines, NeMo's script)."""

import re
from typing import Any

from servegen.errors import ConfigError, one_line


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs from Hydra overrides: `key=v`, `+key=v`, `++key=v`."""
    pairs = [_parse_plain(o) for o in overrides]
    if all(p is not None for p in pairs):
        return pairs
    return _hydra_parse(overrides)


def _hydra_parse(overrides: list[str]) -> list[tuple[str, Any]]:
    # imported here: Hydra's package takes ~70 ms to import, a part of every job's start-up
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {one_line(e)}") from None
    return [(o.key_or_group, o.value()) for o in parsed]


# The overrides servegen writes into job commands and most that users type (numbers, words,
# paths, URLs, simply quoted strings) read here as Hydra's grammar reads them; anything else
# (lists, dicts, escapes, interpolations, whitespace, 1e3, inf...) goes to Hydra's parser.
# tests/generation/test_job_config.py holds both to the same results.
_PLAIN_OVERRIDE = re.compile(r"\+{0,2}([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)", re.S | re.A)
_INT = re.compile(r"[+-]?(?:0|[1-9]\d*)", re.A)
_FLOAT = re.compile(r"[+-]?(?:0|[1-9]\d*)\.\d+", re.A)
_WORDS = re.compile(r"[A-Za-z_/][\w/.:-]*", re.A)
_QUOTED = re.compile(r"'([^'\\$]*)'|\"([^\"\\$]*)\"")
_KEYWORDS = {"true": True, "false": False, "null": None}


def _parse_plain(override: str) -> tuple[str, Any] | None:
    """(key, value) where the override is plain, else None."""
    m = _PLAIN_OVERRIDE.fullmatch(override)
    if m is None:
        return None
    key, text = m.groups()
    if _INT.fullmatch(text):
        return key, int(text)
    if _FLOAT.fullmatch(text):
        return key, float(text)
    if text.lower() in _KEYWORDS:
        return key, _KEYWORDS[text.lower()]
    if _WORDS.fullmatch(text) and text.lower() not in ("inf", "nan"):  # those two are floats
        return key, text
    if q := _QUOTED.fullmatch(text):
        return key, q.group(1) if q.group(1) is not None else q.group(2)
    return None


def hydra_value(value) -> str:
    """A value in Hydra's override grammar; strings are always quoted so none is misread."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if _PLAIN.fullmatch(str(value)) and _parses_as(str(value), value):
        return str(value)  # no quotes where Hydra reads the bare text back as the same string
    # Hydra keeps a backslash as is unless it precedes a quote or ends the string; OmegaConf
    # would resolve ${...} unless escaped
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(value))
    return "'" + text.replace("${", "\\${") + "'"


_PLAIN = re.compile(r"[\w./+@%:-]+")


def _parses_as(text: str, value) -> bool:
    try:
        return parse_overrides([f"k={text}"])[0][1] == value
    except ConfigError:
        return False
