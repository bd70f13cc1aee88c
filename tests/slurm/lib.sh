# Shared by start.sh and stop.sh (sourced, not run): where the single-machine test
# cluster keeps pid files and logs, and how to tell a live daemon from a dead one.

SLURM_LOG=/var/log/slurm
NODES=(node1 node2)

# "command-name pid-file" of each daemon, in start order (stop.sh walks it backwards).
DAEMONS=(
  "munged /run/munge/munged.pid"
  "mariadbd /run/mysqld/mysqld.pid"
  "slurmdbd /run/slurm/slurmdbd.pid"
  "slurmctld /run/slurm/slurmctld.pid"
  "slurmd /run/slurm/slurmd-node1.pid"
  "slurmd /run/slurm/slurmd-node2.pid"
)

# pid_alive PID NAME: PID runs NAME and is not a zombie (PID 1 here reaps orphans
# slowly, so a stopped daemon lingers in state Z for a few seconds).
pid_alive() {
  local pid=$1 name=$2 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ ${stat##*) } != Z* ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

# daemon_pid NAME PIDFILE: prints the pid of the live daemon, fails if there is none.
daemon_pid() {
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 1
  pid=${pid//[[:space:]]/}
  pid_alive "$pid" "$1" || return 1
  echo "$pid"
}

# stop_daemon NAME PIDFILE: SIGTERM, wait up to 30 s for it to go, then SIGKILL.
stop_daemon() {
  local name=$1 pidfile=$2 pid i
  if ! pid=$(daemon_pid "$name" "$pidfile"); then
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    if ! pid_alive "$pid" "$name"; then
      rm -f "$pidfile"
      return 0
    fi
    sleep 0.1
  done
  echo "$name (pid $pid) still running 30 s after SIGTERM; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    if ! pid_alive "$pid" "$name"; then
      rm -f "$pidfile"
      return 0
    fi
    sleep 0.1
  done
  echo "error: could not stop $name (pid $pid, $pidfile)" >&2
  return 1
}
