"""The embedded demo model: a tiny Llama (about 0.6 M parameters) trained here on CPU to answer
additions of two numbers in 0..99 in Llama 3's chat format. No model hub needed; built once
(about 3.5 minutes on 2 cores) into the cache and reused. See docs/demo-model.md."""

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from servegen.cli import run_main
from servegen.demo_model.build import build, model_path, stderr_log
from servegen.demo_model.recipe import Recipe

__all__ = ["Recipe", "build_demo_model", "demo_model_path", "main"]


def demo_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the demo model is, or will be once built: <cache>/demo-model-<recipe hash>, the cache
    being cache_dir, else $SERVEGEN_CACHE_DIR, else ~/.cache/servegen."""
    return model_path(cache_dir, Recipe())


def build_demo_model(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    log: Callable[[str], None] = stderr_log,
    *,
    recipe: Recipe = Recipe(),
) -> Path:
    """The demo model's folder, built first if missing (or if force). Safe to call from several
    processes at once: one builds, the others wait for it. Raises ServegenError if the trained
    model misses its accuracy target."""
    return build(cache_dir, force, log, recipe)


def main(argv: list[str] | None = None) -> int:
    return run_main(_build, argv)


def _build(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="servegen demo-model",
        description="Build the demo model (if not cached) and print its folder.",
    )
    parser.add_argument("--cache_dir", help="cache folder (default: $SERVEGEN_CACHE_DIR or ~/.cache/servegen)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    print(build_demo_model(args.cache_dir, force=args.force))
    return 0
