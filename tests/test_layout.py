"""The project's map holds: no module imports a layer above it (the table in docs/architecture.md
says which layers each may import), and every path the docs name exists."""

import ast
import glob
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
# Top-level folders of this repository: a path in backquotes that starts with one is ours.
OURS = ("servegen", "tests", "benchmarks", "scripts", ".ci", "cluster_configs", "examples", "docs")
# Paths of other projects that the docs cite (in their own repositories).
FOREIGN = {
    "docs/source/commands/trtllm-serve/trtllm-serve.rst",  # TensorRT-LLM
    "examples/inference/launch_inference_server.py",  # Megatron-LM
    "examples/inference/run_inference_server.sh",  # Megatron-LM
    "examples/inference/run_text_generation_server_*.sh",  # Megatron-LM
    "examples/nlp/language_modeling/megatron_gpt_eval.py",  # NeMo
    "examples/online_serving/multi-node-serving.sh",  # vLLM
}


def layer_table() -> dict[str, set[str]]:
    """{layer: the layers it may import}, from the "may import" column of the layers table."""
    rules: dict[str, set[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`servegen"):
            layer = cells[0].strip("`")
            rules[layer] = set(re.findall(r"`([\w./]+)`", cells[2]))
    return rules


def layer_of(module: str, layers) -> str | None:
    """The layer a dotted module (servegen.x.y) belongs to: its longest matching entry."""
    matches = [layer for layer in layers if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def servegen_imports(path: Path) -> set[str]:
    """Every servegen module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if n.split(".")[0] == "servegen")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "servegen")
    return found


def test_the_layers_table_covers_every_module():
    layers = layer_table()
    assert "servegen.errors" in layers and "servegen.generation" in layers
    for path in (REPO / "servegen").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        assert layer_of(module, layers), f"{module} is in no layer of docs/architecture.md's table"


def test_no_module_imports_a_layer_it_may_not():
    layers = layer_table()
    wrong = []
    for path in sorted((REPO / "servegen").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module, layers)
        for imported in sorted(servegen_imports(path)):
            theirs = layer_of(imported, layers)
            if theirs is not None and theirs != own and theirs not in layers[own]:
                wrong.append(f"{path.relative_to(REPO)} ({own}) imports {imported} ({theirs})")
    assert not wrong, "imports across the layers' rules (docs/architecture.md):\n" + "\n".join(wrong)


def test_the_layer_check_sees_an_import_from_above(tmp_path):
    """The check itself can fail: generation importing the pipeline is caught."""
    layers = layer_table()
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from servegen.pipeline.generate import main\n")
    assert servegen_imports(bad) == {"servegen.pipeline.generate", "servegen.pipeline.generate.main"}
    assert layer_of("servegen.pipeline.generate", layers) == "servegen.pipeline"
    assert "servegen.pipeline" not in layers["servegen.generation"]


def named_paths(text: str) -> set[str]:
    """Paths of this repository in backquotes, and relative links, in a markdown text."""
    quoted = {m for m in re.findall(r"`([^`\s]+)`", text) if m.split("/")[0] in OURS and "/" in m}
    links = {m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m}
    # and files of our own folders named in plain text (no other project has these folders)
    bare = set(re.findall(r"(?<![\w/.`])((?:servegen|tests|benchmarks|scripts|docs)/[\w/.-]+\.(?:py|md|sh|yaml|json))", text))
    return quoted | links | bare


def exists(path: str, base: Path) -> bool:
    """Whether a path as the docs write it exists: {a,b} alternatives, <placeholder> or * as
    any name, a trailing ... or ::test_name left out."""
    path = path.split("::")[0].removesuffix("...").rstrip("/") or "."
    alternatives = [path]
    while any("{" in p for p in alternatives):
        p = next(p for p in alternatives if "{" in p)
        head, options, tail = re.match(r"(.*?)\{([^}]*)\}(.*)", p).groups()
        alternatives = [a for a in alternatives if a != p] + [head + o + tail for o in options.split(",")]
    return all(glob.glob(str(base / re.sub(r"<[^>]+>", "*", a))) for a in alternatives)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    missing = []
    for path in sorted(named_paths(doc.read_text()) - FOREIGN):
        # a link is relative to its document, a quoted path to the repository's root
        base = doc.parent if not path.split("/")[0] in OURS else REPO
        if not exists(path, base) and not exists(path, REPO):
            missing.append(path)
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_path_check_sees_a_missing_path():
    assert not exists("tests/inference/test_nowhere.py", REPO)
    assert exists("tests/server/golden/<type>-<nodes>n-<gpus>g.txt", REPO)
    assert exists("servegen/generation/{config,job}.py", REPO)
    assert not exists("servegen/generation/{config,nowhere}.py", REPO)
