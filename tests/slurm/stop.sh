#!/usr/bin/env bash
# Stops the single-machine test cluster that start.sh started (slurmd x2, slurmctld,
# slurmdbd, mariadbd, munged), by pid file, and waits until they are gone. Idempotent.
# Job steps still running are left alone, as with a real slurmd restart.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

[[ $(id -u) == 0 ]] || { echo "stop.sh: error: run as root" >&2; exit 1; }

failed=0
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
  # shellcheck disable=SC2086
  stop_daemon ${DAEMONS[i]} || failed=1
done
((failed == 0)) || { echo "stop.sh: error: some daemons would not stop" >&2; exit 1; }
echo "slurm: stopped"
