"""Prompt configs: what to ask. A YAML file with `system` and `user` texts whose placeholders are
filled from a data row, and optional few-shot examples."""

from dataclasses import dataclass
from pathlib import Path

from servegen.errors import ServegenError
from servegen.prompt.loading import PACKAGE_DIR, candidates, check_mapping, not_found, read_mapping, read_yaml
from servegen.prompt.text import FORMATS, Text

CONFIG_DIR = PACKAGE_DIR / "config"
EXAMPLES_DIR = PACKAGE_DIR / "few_shot_examples"
EXAMPLES_FIELD = "examples"  # the placeholder the rendered few-shot examples fill

_CONFIG_KEYS = {"system": str, "user": str, "format": str, "few_shot_examples": dict}
_FEW_SHOT_KEYS = {"prefix": str, "template": str, "suffix": str, "examples_type": str}


@dataclass(frozen=True)
class FewShot:
    """How examples are written into `{examples}`: prefix + template filled per example + suffix."""

    prefix: str
    template: Text
    suffix: str
    examples_type: str | None


@dataclass(frozen=True)
class PromptConfig:
    source: Path  # the YAML file
    system: Text
    user: Text
    format: str
    few_shot: FewShot | None


def load_config(name: str, config_dir: str | Path | None = None) -> PromptConfig:
    """`name` is a short name under `config_dir` (default: servegen's own configs), e.g.
    `generic/default`, or a path to a YAML file."""
    folder = Path(config_dir) if config_dir is not None else CONFIG_DIR
    looked = candidates(name, folder)
    path = next((p for p in looked if p.is_file()), None)
    if path is None:
        raise not_found("prompt config", name, looked, folder)
    data = read_mapping(path, _CONFIG_KEYS, required=("user",))
    fmt = data.get("format") or "python"
    if fmt not in FORMATS:
        raise ServegenError(f"{path}: key 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    few_shot = None
    if data.get("few_shot_examples") is not None:
        where = f"{path} key 'few_shot_examples'"
        block = check_mapping(data["few_shot_examples"], where, _FEW_SHOT_KEYS, required=("template",))
        few_shot = FewShot(
            prefix=block.get("prefix") or "",
            template=Text(block["template"], fmt, f"prompt config {path} key 'few_shot_examples.template'"),
            suffix=block.get("suffix") or "",
            examples_type=block.get("examples_type"),
        )
    config = PromptConfig(
        source=path,
        system=Text(data.get("system") or "", fmt, f"prompt config {path} key 'system'"),
        user=Text(data["user"], fmt, f"prompt config {path} key 'user'"),
        format=fmt,
        few_shot=few_shot,
    )
    if few_shot is not None and EXAMPLES_FIELD not in config.user.fields:
        raise ServegenError(
            f"{path}: has few_shot_examples, so key 'user' needs an {{{EXAMPLES_FIELD}}} placeholder for them"
        )
    return config


def load_examples(examples_type: str) -> list[dict]:
    """A named example set from servegen/prompt/few_shot_examples/*.yaml (each file maps names to
    lists of example dicts), or a path to a YAML file holding one such list."""
    if examples_type.endswith((".yaml", ".yml")):
        path = Path(examples_type).expanduser()
        if not path.is_file():
            raise ServegenError(f"unknown few-shot examples {examples_type!r}: no file {path}")
        return _check_examples(read_yaml(path), str(path))
    sets: dict[str, tuple[Path, object]] = {}
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ServegenError(f"{path}: expected a mapping of example set names to lists of examples")
        for name, examples in data.items():
            if name in sets:
                raise ServegenError(f"few-shot example set {name!r} is defined in both {sets[name][0]} and {path}")
            sets[name] = (path, examples)
    if examples_type not in sets:
        raise ServegenError(
            f"unknown few-shot examples {examples_type!r}: looked in {EXAMPLES_DIR}/*.yaml; "
            f"the known sets are {', '.join(sorted(sets))}"
        )
    path, examples = sets[examples_type]
    return _check_examples(examples, f"{path} set {examples_type!r}")


def _check_examples(examples: object, where: str) -> list[dict]:
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) for e in examples):
        raise ServegenError(f"{where}: expected a non-empty list of examples, each a mapping of fields")
    return examples
