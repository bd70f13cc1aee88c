"""The README's Python block runs as written (with the test server's address) and prints the
demo model's answer; its shell commands name files that exist."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_python_block_runs_against_the_real_server(vllm_server):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert 'base_url="http://127.0.0.1:5000"' in block
    code = block.replace("http://127.0.0.1:5000", vllm_server.base_url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "2 + 2 = 4.\n"


def test_setup_commands_exist_and_ci_runs_the_test_command():
    commands = re.findall(r"```bash\n(\./scripts/\S+)\n```", README)
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    for command in commands:
        assert (REPO / command).stat().st_mode & 0o111, f"{command} is not executable"
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
