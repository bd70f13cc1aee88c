"""The `golden` fixture (tests/conftest.py): a mismatch fails; SERVEGEN_UPDATE_GOLDEN=1 rewrites the
file and still fails, so a rewrite is never counted as a pass; where CI is set it refuses."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run(folder: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "SERVEGEN_UPDATE_GOLDEN")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(folder)],
                          capture_output=True, text=True, timeout=120, env={**base, **env}, cwd=folder)


def test_a_golden_file_is_compared_rewritten_only_on_request_and_a_rewrite_never_passes(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_it.py").write_text("def test_it(golden):\n    golden('out.txt', 'new text\\n')\n")
    golden = tmp_path / "golden" / "out.txt"

    missing = run(tmp_path)
    assert missing.returncode == 1 and "is missing" in missing.stdout
    written = run(tmp_path, SERVEGEN_UPDATE_GOLDEN="1")
    assert written.returncode == 1 and "written; review the diff" in written.stdout
    assert golden.read_text() == "new text\n"
    assert run(tmp_path).returncode == 0  # now it matches
    assert run(tmp_path, SERVEGEN_UPDATE_GOLDEN="1").returncode == 0  # nothing to rewrite: a real comparison

    golden.write_text("old text\n")
    differs = run(tmp_path)
    assert differs.returncode == 1 and "differs from golden file" in differs.stdout
    refused = run(tmp_path, SERVEGEN_UPDATE_GOLDEN="1", CI="true")
    assert refused.returncode == 1 and "refused where CI is set" in refused.stdout
    assert golden.read_text() == "old text\n"
    rewritten = run(tmp_path, SERVEGEN_UPDATE_GOLDEN="1")
    assert rewritten.returncode == 1 and "rewritten; review the diff" in rewritten.stdout
    assert golden.read_text() == "new text\n"
