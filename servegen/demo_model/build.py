"""The demo model's cache folder: named by a hash of the recipe, built once under a file lock into
a temporary folder beside it, then renamed into place."""

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from servegen.demo_model.recipe import Recipe
from servegen.errors import ServegenError

BUILD_INFO = "build_info.json"
# The code that decides the weights: editing it builds a new model, as a recipe change does.
RECIPE_SOURCES = ("data.py", "recipe.py", "tokenizer.py", "train.py")


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SERVEGEN_CACHE_DIR") or Path.home() / ".cache" / "servegen")


def recipe_hash(recipe: Recipe) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    for name in RECIPE_SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:8]


def model_path(cache_dir: str | os.PathLike | None, recipe: Recipe) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser().absolute() / f"demo-model-{recipe_hash(recipe)}"


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def build(
    cache_dir: str | os.PathLike | None,
    force: bool,
    log: Callable[[str], None],
    recipe: Recipe,
) -> Path:
    folder = model_path(cache_dir, recipe)
    # The rename is the last step of a build, so a folder that exists is complete.
    if folder.is_dir() and not force:
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path(folder), "a")
    except OSError as e:
        raise ServegenError(f"cannot write the demo model cache {folder.parent}: {e}; set SERVEGEN_CACHE_DIR or --cache_dir") from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {folder} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
            if folder.is_dir():  # even with force: it is as fresh as our own build would be
                log(f"built by another process: {folder}")
                return folder
        if folder.is_dir() and not force:
            return folder
        # Whoever left these died while building: we hold the lock now.
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _build_into(tmp, recipe, recipe_hash(recipe), log)
            if folder.exists():  # --force: swap the old build out, then delete it
                old = folder.parent / f".{folder.name}.tmp-old-{os.getpid()}"
                os.rename(folder, old)
                os.rename(tmp, folder)
                shutil.rmtree(old)
            else:
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"demo model built: {folder}")
    return folder


def _build_into(tmp: Path, recipe: Recipe, hash_: str, log: Callable[[str], None]) -> None:
    start = time.monotonic()
    try:
        from servegen.demo_model import train
    except ImportError as e:
        raise ServegenError(f"building the demo model needs torch and transformers ({e}): pip install 'servegen[demo]'") from e
    from servegen.demo_model.data import held_out_pairs

    log(f"building the demo model (recipe {hash_}): tokenizer ...")
    tokenizer = train.build_tokenizer(recipe)
    log(f"training {recipe.steps} steps on {recipe.threads} threads (a few minutes) ...")
    model = train.train(tokenizer, recipe, log)
    accuracy = train.held_out_accuracy(model, tokenizer, held_out_pairs())
    json_accuracy = train.held_out_accuracy(model, tokenizer, held_out_pairs(), json_form=True)
    log(f"held-out accuracy: {accuracy:.1%} plain, {json_accuracy:.1%} JSON")
    if min(accuracy, json_accuracy) < recipe.min_accuracy:
        raise ServegenError(
            f"the demo model reached {accuracy:.1%} (plain) and {json_accuracy:.1%} (JSON) held-out accuracy, "
            f"below {recipe.min_accuracy:.0%}: the build recipe in servegen/demo_model/ needs fixing"
        )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "recipe_hash": hash_,
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": recipe.steps,
        "held_out_accuracy": accuracy,
        "held_out_json_accuracy": json_accuracy,
        "build_seconds": round(time.monotonic() - start, 1),
    }
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    # mkdtemp makes the folder 0700 and transformers writes the weights 0600: let others read them.
    tmp.chmod(0o755)
    for path in tmp.iterdir():
        path.chmod(0o644)
