import fcntl
import json
import os
import subprocess
import sys
import time

import pytest

from servegen.demo_model import Recipe, build_demo_model, demo_model_path
from servegen.demo_model.build import lock_path, model_path
from servegen.errors import ServegenError

# Trains for a few steps only: for the cache mechanics, not for the answers.
TINY = Recipe(steps=3, warmup_steps=1, min_accuracy=0.0)
TINY_BUILD = (
    "import sys\n"
    "from servegen.demo_model import Recipe, build_demo_model\n"
    "print(build_demo_model(sys.argv[1], recipe=Recipe(steps=3, warmup_steps=1, min_accuracy=0.0)))\n"
)


def test_second_call_comes_from_the_cache(demo_model_dir):
    weights = demo_model_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (demo_model_dir / "build_info.json").stat().st_mtime_ns)
    logged = []
    start = time.monotonic()
    assert build_demo_model(log=logged.append) == demo_model_dir
    assert time.monotonic() - start < 10  # a build takes minutes
    assert logged == []
    assert (weights.stat().st_mtime_ns, (demo_model_dir / "build_info.json").stat().st_mtime_ns) == before
    assert demo_model_path() == demo_model_dir


def test_command_prints_only_the_path(demo_model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "servegen.demo_model"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{demo_model_dir}\n"


def test_cache_folder_follows_env_and_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEGEN_CACHE_DIR", str(tmp_path))
    path = demo_model_path()
    assert path.parent == tmp_path and path.name.startswith("demo-model-") and len(path.name) == len("demo-model-") + 8
    assert demo_model_path(tmp_path / "other") == tmp_path / "other" / path.name
    assert model_path(tmp_path, Recipe(steps=999)) != path
    assert model_path(tmp_path, Recipe()) == path


def test_concurrent_builders_train_once(tmp_path):
    folder = model_path(tmp_path, TINY)
    stale = tmp_path / f".{folder.name}.tmp-from-a-dead-build"
    stale.mkdir(parents=True)
    # Hold the lock ourselves until both builders are queued on it, so they surely overlap.
    with open(lock_path(folder), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = []
        for i in range(2):
            err = open(tmp_path / f"stderr{i}", "w+")
            procs.append((subprocess.Popen([sys.executable, "-c", TINY_BUILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=err, text=True), err))
        deadline = time.monotonic() + 60
        while not all("waiting for another process" in (tmp_path / f"stderr{i}").read_text() for i in range(2)):
            assert time.monotonic() < deadline, "the builders never waited for the lock"
            assert all(p.poll() is None for p, _ in procs), "a builder ended while the lock was held"
            time.sleep(0.1)
        assert not folder.exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    outs, errs = [], []
    for p, err in procs:
        outs.append(p.communicate(timeout=300)[0])
        assert p.returncode == 0
        err.seek(0)
        errs.append(err.read())
    assert outs == [f"{folder}\n"] * 2
    assert sum("training 3 steps" in e for e in errs) == 1, errs
    assert sum("built by another process" in e for e in errs) == 1, errs
    assert json.loads((folder / "build_info.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".demo")) == [lock_path(folder).name]


def test_force_rebuilds_in_place(tmp_path):
    folder = build_demo_model(tmp_path, recipe=TINY, log=lambda _: None)
    first = (folder / "build_info.json").stat().st_mtime_ns
    assert build_demo_model(tmp_path, force=True, recipe=TINY, log=lambda _: None) == folder
    assert (folder / "build_info.json").stat().st_mtime_ns != first
    assert {p.name for p in tmp_path.iterdir()} == {folder.name, lock_path(folder).name}
    assert os.access(folder / "model.safetensors", os.R_OK)


def test_build_below_target_fails_and_leaves_nothing(tmp_path):
    bad = Recipe(steps=3, warmup_steps=1)  # 3 steps cannot reach 95%
    with pytest.raises(ServegenError, match="held-out accuracy"):
        build_demo_model(tmp_path, recipe=bad, log=lambda _: None)
    assert [p.name for p in tmp_path.iterdir()] == [lock_path(model_path(tmp_path, bad)).name]
