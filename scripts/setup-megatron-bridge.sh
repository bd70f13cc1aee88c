#!/usr/bin/env bash
# Build Megatron-Bridge's environment, ./.venv-megatron (Python 3.12: megatron-bridge 0.6.2 needs
# >= 3.12, < 3.13), from scripts/megatron-bridge-requirements.txt. servegen runs its conversion
# script there (servegen/conversion/megatron/). Idempotent: a second run with the same
# requirements returns at once. PYTHON312=/path/to/python3.12 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=scripts/megatron-bridge-requirements.txt
stamp=.venv-megatron/.servegen-setup
want=$(cat "$requirements" scripts/setup-megatron-bridge.sh | sha256sum | cut -c1-16)
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0

is_312() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
python=""
for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
        $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r); do
    if [ -n "$candidate" ] && is_312 "$candidate"; then python=$candidate; break; fi
done
[ -n "$python" ] || { echo "error: Megatron-Bridge needs Python 3.12 and none was found (set PYTHON312=/path/to/python3.12, or: pyenv install 3.12)" >&2; exit 2; }

echo "setup: building .venv-megatron with Megatron-Bridge (a few minutes the first time, ~6 GB)" >&2
rm -rf .venv-megatron  # a half-built one (no stamp) is started again
"$python" -m venv .venv-megatron
log=.venv-megatron/setup.log
bridge=$(grep '^megatron-bridge==' "$requirements")
# pip's log goes to a file (this machine's mirrors make it noisy); its tail shows on failure
{ .venv-megatron/bin/pip install -r <(grep -v '^megatron-bridge==' "$requirements") \
    && .venv-megatron/bin/pip install --no-deps "$bridge"; } > "$log" 2>&1 \
    || { tail -40 "$log" >&2; echo "error: pip install into .venv-megatron failed; full log: $log" >&2; exit 1; }
echo "$want" > "$stamp"
