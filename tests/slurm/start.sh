#!/usr/bin/env bash
# Starts a real two-node Slurm cluster (with accounting, 4 fake GPUs per node) on this
# one machine for the tests, or confirms it is already up. Idempotent; needs root.
# What it sets up and why: docs/slurm-test-cluster.md.
#
# Usage: tests/slurm/start.sh      (SLURM_START_TIMEOUT_S=120 bounds the wait for nodes)
# Prints one line on stdout, e.g. "slurm: 2 nodes idle (partition batch)"; progress and
# errors go to stderr; exits non-zero with the reason and the daemon logs' tails.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

CLUSTER=servegen
ACCOUNT=servegen
PARTITION=batch
CPUS_PER_NODE=8
GPUS_PER_NODE=4
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=servegen-test-cluster  # local socket only (mariadbd runs with --skip-networking)
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
TIMEOUT_S=${SLURM_START_TIMEOUT_S:-120}

log() { echo "start.sh: $*" >&2; }

die() {
  echo "start.sh: error: $*" >&2
  local f
  for f in "$SLURM_LOG"/slurmctld.log "$SLURM_LOG"/slurmd-node1.log "$SLURM_LOG"/slurmd-node2.log \
    "$SLURM_LOG"/slurmdbd.log "$SLURM_LOG"/mariadb.log "$SLURM_LOG"/munged.log; do
    if [[ -s $f ]]; then
      echo "---- last lines of $f" >&2
      tail -n 15 "$f" >&2
    fi
  done
  exit 1
}

# wait_for SECONDS WHAT DAEMON COMMAND...: retries COMMAND every 0.2 s until it succeeds.
# DAEMON ("name pidfile", or "") is the one being waited for: give up early once it has
# been gone for 10 s (a fresh daemon may not have written its pid file yet).
wait_for() {
  local seconds=$1 what=$2 daemon=$3 end gone_since=
  shift 3
  end=$((SECONDS + seconds))
  while true; do
    # shellcheck disable=SC2086
    if [[ -n $daemon ]] && ! daemon_pid $daemon >/dev/null; then
      gone_since=${gone_since:-$SECONDS}
      ((SECONDS - gone_since < 10)) || die "${daemon% *} exited while starting"
    else
      gone_since=
    fi
    "$@" >/dev/null 2>&1 && return 0
    ((SECONDS < end)) || die "$what not ready after ${seconds} s"
    sleep 0.2
  done
}

install_packages() {
  local missing=() p status apt_log=/var/log/servegen-slurm-apt.log
  for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]} (log: $apt_log)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; then
    return 0
  fi
  # Only a stale or missing package list is worth an `apt-get update`.
  if ! grep -qE "Unable to locate package|has no installation candidate|404 +Not Found|Failed to fetch" "$apt_log"; then
    tail -n 20 "$apt_log" >&2
    die "apt-get install ${missing[*]} failed (see $apt_log)"
  fi
  log "package list missing or stale: apt-get update, then retrying"
  if ! { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } >>"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    die "apt-get install ${missing[*]} failed after apt-get update (see $apt_log)"
  fi
}

# Slurm only hands out GRES backed by character devices; these stand in for /dev/nvidiaN.
make_fake_gpus() {
  local i dev
  for ((i = 0; i < GPUS_PER_NODE; i++)); do
    dev=/dev/slurm-fakegpu$i
    [[ -c $dev ]] && continue
    rm -f "$dev"
    mknod -m 0666 "$dev" c 1 3 || die "cannot create fake GPU device $dev (mknod needs CAP_MKNOD)"
  done
}

# Node memory: a quarter of the host (or of its cgroup limit) per node, so both fake
# nodes together promise half of what is really there.
node_memory_mb() {
  local kb limit mb
  kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo max)
  if [[ $limit =~ ^[0-9]+$ ]] && ((limit / 1024 < kb)); then
    kb=$((limit / 1024))
  fi
  mb=$((kb / 1024 / 4 / 256 * 256))
  ((mb >= 1024)) || mb=1024
  echo "$mb"
}

slurm_conf() {
  local host=$1 mem=$2
  cat <<EOF
# Written by tests/slurm/start.sh: a two-node test cluster on one machine.
# See docs/slurm-test-cluster.md. Edits are overwritten on the next start.sh.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=20
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=$SLURM_LOG/slurmctld.log
SlurmdLogFile=$SLURM_LOG/slurmd-%n.log
ReturnToService=2
MinJobAge=3600

SchedulerType=sched/backfill
# Pending jobs that become eligible by time (a requeued job's BeginTime) wait for the
# next scheduling pass: every 60 s by default.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / CPUS_PER_NODE))
DependencyParameters=kill_invalid_depend

# submitit checkpoints on USR2 (--signal=USR2@90), then runs "scontrol requeue".
# Jobs of QOS "high" preempt jobs of QOS "normal" (requeue, GraceTime on "normal"),
# and preempted jobs get their --signal right away.
JobRequeue=1
PreemptType=preempt/qos
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

GresTypes=gpu
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS_PER_NODE Sockets=1 CoresPerSocket=$CPUS_PER_NODE ThreadsPerCore=1 RealMemory=$mem Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

gres_conf() {
  cat <<EOF
# Written by tests/slurm/start.sh: fake GPUs (character devices made with mknod).
AutoDetect=off
NodeName=node[1-2] Name=gpu File=/dev/slurm-fakegpu[0-$((GPUS_PER_NODE - 1))]
EOF
}

slurmdbd_conf() {
  local host=$1
  cat <<EOF
# Written by tests/slurm/start.sh.
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$SLURM_LOG/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF
}

# put_file PATH MODE CONTENT: writes PATH only if CONTENT differs; fails if unchanged.
put_file() {
  local path=$1 mode=$2 content=$3
  if [[ -f $path && $(cat "$path") == "$content" ]]; then
    chmod "$mode" "$path"
    return 1
  fi
  printf '%s\n' "$content" >"$path.tmp"
  chmod "$mode" "$path.tmp"
  mv "$path.tmp" "$path"
}

# Sets SLURM_CONF_CHANGED / DBD_CONF_CHANGED to 1 when a file had to be (re)written.
write_configs() {
  local host mem
  host=$(hostname -s)
  mem=$(node_memory_mb)
  mkdir -p /etc/slurm
  SLURM_CONF_CHANGED=0
  DBD_CONF_CHANGED=0
  if put_file /etc/slurm/slurm.conf 0644 "$(slurm_conf "$host" "$mem")"; then SLURM_CONF_CHANGED=1; fi
  if put_file /etc/slurm/gres.conf 0644 "$(gres_conf)"; then SLURM_CONF_CHANGED=1; fi
  # slurmdbd refuses a config readable by others.
  if put_file /etc/slurm/slurmdbd.conf 0600 "$(slurmdbd_conf "$host")"; then DBD_CONF_CHANGED=1; fi
}

# node_states: "node state" lines from sinfo, e.g. "node1 idle", "node2 drained*".
node_states() {
  timeout 10 sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null
}

# nodes_up: both nodes respond and take jobs (idle, or busy with jobs).
nodes_up() {
  local states node state n=0
  states=$(node_states) || return 1
  while read -r node state; do
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    n=$((n + 1))
  done <<<"$states"
  ((n == ${#NODES[@]}))
}

all_daemons_alive() {
  local entry
  for entry in "${DAEMONS[@]}"; do
    # shellcheck disable=SC2086
    daemon_pid $entry >/dev/null || return 1
  done
}

report() {
  local states node state all_idle=1 list=""
  states=$(node_states)
  while read -r node state; do
    [[ $state == idle ]] || all_idle=0
    list+="${list:+, }$node $state"
  done <<<"$states"
  if ((all_idle)); then
    echo "slurm: ${#NODES[@]} nodes idle (partition $PARTITION)"
  else
    echo "slurm: ${#NODES[@]} nodes up (partition $PARTITION: $list)"
  fi
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key || die "mungekey --create failed"
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  if ! daemon_pid munged /run/munge/munged.pid >/dev/null; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged </dev/null >>"$SLURM_LOG/munged.log" 2>&1 ||
      die "munged did not start (see also /var/log/munge/munged.log)"
  fi
  wait_for 10 "munge (munge -n | unmunge)" "munged /run/munge/munged.pid" bash -c "munge -n | unmunge"
}

start_mariadb() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    log "initialising the MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >>"$SLURM_LOG/mariadb.log" 2>&1 ||
      die "mariadb-install-db failed"
  fi
  if ! daemon_pid mariadbd /run/mysqld/mysqld.pid >/dev/null; then
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid </dev/null >>"$SLURM_LOG/mariadb.log" 2>&1 &
  fi
  wait_for 60 "mariadbd" "mariadbd /run/mysqld/mysqld.pid" mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  mariadb --socket=/run/mysqld/mysqld.sock -u root <<EOF || die "cannot create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

start_slurmdbd() {
  if ((DBD_CONF_CHANGED)); then
    stop_daemon slurmdbd /run/slurm/slurmdbd.pid || die "cannot stop slurmdbd"
  fi
  if ! daemon_pid slurmdbd /run/slurm/slurmdbd.pid >/dev/null; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd </dev/null >>"$SLURM_LOG/slurmdbd.start.log" 2>&1 || die "slurmdbd did not start"
  fi
  wait_for 60 "slurmdbd (sacctmgr show cluster)" "slurmdbd /run/slurm/slurmdbd.pid" timeout 10 sacctmgr -n show cluster
}

# sacct_has ARGS...: sacctmgr lists something for ARGS.
sacct_has() {
  [[ -n $(timeout 20 sacctmgr -n -P "$@" 2>/dev/null) ]]
}

sam() {
  timeout 20 sacctmgr -i "$@" >/dev/null || die "sacctmgr $* failed"
}

# Cluster, account and root's association, and the preemption QOS, each added once.
ensure_accounting() {
  sacct_has show cluster "$CLUSTER" format=cluster || sam add cluster "$CLUSTER"
  sacct_has show account "$ACCOUNT" format=account ||
    sam add account "$ACCOUNT" Cluster="$CLUSTER" Description="servegen tests" Organization=servegen
  sacct_has show assoc where cluster="$CLUSTER" account="$ACCOUNT" user=root format=user ||
    sam add user root Account="$ACCOUNT" Cluster="$CLUSTER"
  sacct_has show qos high format=name || sam add qos high
  [[ $(timeout 20 sacctmgr -n -P show qos high format=priority,preempt,preemptmode) == "100|normal|requeue" ]] ||
    sam modify qos where name=high set Priority=100 Preempt=normal PreemptMode=requeue
  # Time a preempted job gets (after its USR2) to checkpoint and requeue itself.
  [[ $(timeout 20 sacctmgr -n -P show qos normal format=gracetime) == "00:01:00" ]] ||
    sam modify qos where name=normal set GraceTime=60
}

start_slurm() {
  local node
  if ((SLURM_CONF_CHANGED)); then
    for node in "${NODES[@]}"; do
      stop_daemon slurmd "/run/slurm/slurmd-$node.pid" || die "cannot stop slurmd -N $node"
    done
    stop_daemon slurmctld /run/slurm/slurmctld.pid || die "cannot stop slurmctld"
  fi
  if ! daemon_pid slurmctld /run/slurm/slurmctld.pid >/dev/null; then
    log "starting slurmctld"
    /usr/sbin/slurmctld </dev/null >>"$SLURM_LOG/slurmctld.start.log" 2>&1 || die "slurmctld did not start"
  fi
  wait_for 30 "slurmctld (scontrol ping)" "slurmctld /run/slurm/slurmctld.pid" bash -c "timeout 10 scontrol ping | grep -q 'is UP'"
  for node in "${NODES[@]}"; do
    mkdir -p "/var/spool/slurmd/$node"
    if ! daemon_pid slurmd "/run/slurm/slurmd-$node.pid" >/dev/null; then
      log "starting slurmd -N $node"
      /usr/sbin/slurmd -N "$node" </dev/null >>"$SLURM_LOG/slurmd-$node.start.log" 2>&1 ||
        die "slurmd -N $node did not start"
    fi
  done
}

# Waits for both nodes to take jobs; resumes nodes left drained or down (say, by an
# earlier bad config), and fails fast if a daemon dies meanwhile.
wait_nodes_up() {
  local start=$SECONDS end=$((SECONDS + TIMEOUT_S)) node state entry
  declare -A resumed=()
  until nodes_up; do
    # After 10 s, as a fresh slurmd may not have written its pid file yet.
    for entry in "${DAEMONS[@]:2}"; do
      # shellcheck disable=SC2086
      ((SECONDS - start < 10)) || daemon_pid $entry >/dev/null || die "${entry% *} died while starting (${entry#* })"
    done
    while read -r node state; do
      if [[ $state =~ ^(drained|draining|down|fail|failing)$ && -z ${resumed[$node]:-} ]]; then
        log "resuming $node (was $state: $(scontrol show node "$node" | sed -n 's/^ *Reason=//p'))"
        scontrol update nodename="$node" state=resume || true
        resumed[$node]=1
      fi
    done < <(node_states || true)
    if ((SECONDS >= end)); then
      sinfo -N -p "$PARTITION" -o '%N %T %E' >&2 || true
      die "nodes not up after ${TIMEOUT_S} s"
    fi
    sleep 0.5
  done
}

main() {
  if [[ $(id -u) != 0 ]]; then
    echo "start.sh: error: run as root: it installs packages and starts system daemons" >&2
    exit 1
  fi
  install_packages
  mkdir -p "$SLURM_LOG" /run/slurm /var/spool/slurmctld
  make_fake_gpus
  write_configs
  if ((!SLURM_CONF_CHANGED && !DBD_CONF_CHANGED)) && all_daemons_alive && nodes_up; then
    report
    return 0
  fi
  ((SLURM_CONF_CHANGED || DBD_CONF_CHANGED)) && log "configuration written to /etc/slurm"
  start_munge
  start_mariadb
  start_slurmdbd
  ensure_accounting
  start_slurm
  wait_nodes_up
  report
}

main "$@"
