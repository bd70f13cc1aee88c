"""Finding prompt configs, templates and few-shot example sets by short name or by path, and reading
their YAML with errors that name the file and the key."""

import re
from pathlib import Path

import yaml

from servegen.errors import ServegenError

PACKAGE_DIR = Path(__file__).parent
# `generic/default`, `llama3-instruct`: no leading dot or slash, no `..`, no `.yaml`.
_SHORT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")


def is_short_name(name: str) -> bool:
    return bool(_SHORT_NAME.fullmatch(name)) and not name.endswith((".yaml", ".yml"))


def candidates(name: str, folder: Path) -> list[Path]:
    """Where the YAML file `name` may be: <folder>/<name>.yaml for a short name, else the path itself."""
    if is_short_name(name):
        return [folder / f"{name}.yaml"]
    return [Path(name).expanduser()]


def available(folder: Path) -> list[str]:
    """The short names of the YAML files under `folder`."""
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def not_found(what: str, name: str, looked: list, folder: Path) -> ServegenError:
    """`looked`: the paths (or descriptions) tried, in order."""
    places = ", ".join(str(p) for p in looked)
    known = ", ".join(available(folder))
    return ServegenError(f"unknown {what} {name!r}: looked at {places}; the known ones are {known}")


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text()
    except OSError as e:
        raise ServegenError(f"cannot read {path}: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ServegenError(f"{path}{where}: not valid YAML: {problem}") from e


def read_mapping(path: Path, allowed: dict[str, type | tuple[type, ...]], required: tuple[str, ...]) -> dict:
    """The YAML file's mapping, checked: only `allowed` keys, each of its type, and every `required` key."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ServegenError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return check_mapping(data, str(path), allowed, required)


def check_mapping(
    data: dict, where: str, allowed: dict[str, type | tuple[type, ...]], required: tuple[str, ...]
) -> dict:
    for key, value in data.items():
        if key not in allowed:
            raise ServegenError(f"{where}: unknown key {key!r} (known keys: {', '.join(allowed)})")
        if value is not None and not isinstance(value, allowed[key]):
            raise ServegenError(f"{where}: key {key!r} must be {_type_names(allowed[key])}, got {type(value).__name__}")
    for key in required:
        if data.get(key) is None:
            raise ServegenError(f"{where}: missing key {key!r}")
    return data


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", list: "a list", dict: "a mapping", bool: "true or false"}
    return " or ".join(names.get(t, t.__name__) for t in types)
