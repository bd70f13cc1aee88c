"""servegen's side of Megatron-Bridge: where the bridge's Python is, the files copied where it
can see them, and the command that runs them. Imports nothing of megatron (servegen runs on
Python 3.11; the bridge needs 3.12)."""

import os
from pathlib import Path

from servegen.errors import ConversionError

HERE = Path(__file__).resolve().parent
SCRIPT = "convert_in_bridge_env.py"
# the script and the one module it imports, copied together into the partial folder
SCRIPT_FILES = (HERE / SCRIPT, HERE / "cpu_accommodations.py")
PYTHON_ENV = "SERVEGEN_MEGATRON_PYTHON"
SETUP = "scripts/setup-megatron-bridge.sh"
DEFAULT_VENV = HERE.parents[2] / ".venv-megatron"  # what SETUP builds at the repository's root


def bridge_python() -> str:
    """$SERVEGEN_MEGATRON_PYTHON, else the venv scripts/setup-megatron-bridge.sh builds."""
    return os.environ.get(PYTHON_ENV) or str(DEFAULT_VENV / "bin" / "python")


def require_bridge_python() -> str:
    python = bridge_python()
    if not os.access(python, os.X_OK):
        raise ConversionError(f"Megatron-Bridge's environment is not here ({python}): run {SETUP}, or set "
                              f"{PYTHON_ENV} to a Python that has megatron-bridge, or containers.megatron")
    return python


def bridge_argv(direction: str, input: str, partial: str, python: str, scripts_dir: str,
                dtype: str | None = None) -> list[str]:
    """direction: hf_to_megatron (dtype: bfloat16/float16/float32) or megatron_to_hf (the
    checkpoint's own dtype)."""
    argv = [python, f"{scripts_dir}/{SCRIPT}", direction, input, partial]
    return argv + (["--dtype", dtype] if direction == "hf_to_megatron" and dtype else [])
