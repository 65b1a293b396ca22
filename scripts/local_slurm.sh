#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, from Debian's packages, for testing the workflow's SLURM path
# (profiles/slurm-local, tests/workflow/test_slurm.py) without a cluster.
#
#   scripts/local_slurm.sh start    install if missing, configure, start munged + slurmctld + slurmd, wait
#                                   until the node is idle (idempotent: a healthy cluster is left as it is)
#   scripts/local_slurm.sh stop     stop the daemons (idempotent; the packages stay installed)
#   scripts/local_slurm.sh status   sinfo and the daemons' pids; exit 1 when the cluster is not up
#
# Needs root (apt-get, /etc/slurm, daemons). The node gets this machine's cores and memory as `slurmd -C`
# reports them, no GPUs, in one partition named `local` (the default partition).
#
# Accounting: none. snakemake-executor-plugin-slurm asks `sacct` for job states by default, and `sacct`
# without slurmdbd fails ("Slurm accounting storage is disabled"), so that path would need slurmdbd + MariaDB.
# The plugin can instead poll `squeue --states=all` (its `status_command: squeue` setting), which slurmctld
# answers from memory for MinJobAge seconds after a job ends; we set MinJobAge to an hour, far above the
# plugin's required 3 x 40 s, and profiles/slurm-local selects `squeue`. No account is used
# (`slurm-no-account`), because checking one needs sacctmgr, i.e. slurmdbd again.
#
# No systemd in our containers: the daemons are started directly (munged as the munge user, slurmctld and
# slurmd as root, which drop to SlurmUser where they should). Processes are tracked by their parent pid
# (proctrack/linuxproc) and tasks are pinned to their cores by task/affinity, so nothing here needs cgroups:
# memory limits are passed to SLURM (and shown by squeue) but not enforced, which is enough for a test node.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by mixrepro scripts/local_slurm.sh"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
RUN_DIR=/run/slurm
MUNGE_RUN=/run/munge
PARTITION=local
START_TIMEOUT_S=${LOCAL_SLURM_START_TIMEOUT_S:-90}

die() {
  echo "local_slurm: error: $*" >&2
  exit 2
}

say() { echo "local_slurm: $*"; }

need_root() {
  [ "$(id -u)" -eq 0 ] \
    || die "must run as root (it installs packages, writes $CONF and starts daemons); try: sudo $0 $*"
}

install_if_missing() {
  local missing=()
  for tool in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
    command -v "$tool" > /dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing SLURM and munge from Debian packages (missing: ${missing[*]})"
  command -v apt-get > /dev/null \
    || die "no apt-get here: install slurmctld, slurmd, slurm-client and munge with this system's package manager"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q > /dev/null || die "apt-get update failed (is a Debian mirror reachable?)"
  # The packages try to start their services; with no init system that fails harmlessly (policy-rc.d).
  local apt_log=/tmp/local_slurm_apt.log
  if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge > "$apt_log" 2>&1; then
    tail -20 "$apt_log" >&2
    die "apt-get install of slurmctld slurmd slurm-client munge failed (full log: $apt_log)"
  fi
}

node_line() {
  # `slurmd -C` prints this machine as SLURM sees it: "NodeName=vm CPUs=2 ... RealMemory=24105"; a RealMemory
  # above what slurmd measures would make the node invalid, so we take its own numbers.
  /usr/sbin/slurmd -C | head -1
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script (a real cluster's config?); refusing to overwrite it"
  fi
  local node host
  node=$(node_line)
  host=$(echo "$node" | sed -n 's/^NodeName=\([^ ]*\).*/\1/p')
  [ -n "$host" ] || die "could not read this node's name from 'slurmd -C': $node"
  mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR"
  chown slurm:slurm "$LOG_DIR" "$STATE_DIR/slurmctld" "$RUN_DIR"
  local tmp="$CONF.tmp"
  cat > "$tmp" << EOF
$MARKER; rewritten on every start
ClusterName=mixrepro-local
# the node talks to itself over loopback: no DNS entry for the host name needed
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# no cgroups needed (containers): track a job's processes by parent pid; bind tasks to their cores with
# sched_setaffinity (task/affinity), so a job's threads stay on the CPUs SLURM gave it
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
# cores and memory are consumable, so jobs asking for all cores run one after another
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# a node that was down (machine restarted, daemons stopped) comes back as soon as slurmd registers
ReturnToService=2
# no accounting database: finished jobs stay visible to squeue/scontrol for an hour instead (see the header)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
# scancel/timeouts: give a killed job's processes a few seconds after SIGTERM, then SIGKILL
KillWait=10
# let the node answer quickly after a start
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$tmp" "$CONF"
}

pid_alive() {  # pid_alive FILE: the pid in FILE is a running process
  local pid
  pid=$(cat "$1" 2> /dev/null) && kill -0 "$pid" 2> /dev/null
}

start_munge() {
  if pid_alive "$MUNGE_RUN/munged.pid"; then
    return 0
  fi
  [ -s /etc/munge/munge.key ] || { say "creating /etc/munge/munge.key"; /usr/sbin/mungekey --create --force; }
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  mkdir -p /var/log/munge /var/lib/munge && chown munge:munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  munge -n | unmunge > /dev/null \
    || die "munge cannot encode and decode a credential (see /var/log/munge/munged.log)"
}

node_state() {
  # long state of the node; a suffix such as "idle*" (not responding) does not count as up
  sinfo -h -p "$PARTITION" -o %T 2> /dev/null | head -1
}

healthy() {
  pid_alive "$MUNGE_RUN/munged.pid" && pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" \
    && case "$(node_state)" in idle | mixed | allocated | completing) true ;; *) false ;; esac
}

start() {
  need_root "$@"
  install_if_missing
  if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" && healthy; then
    say "already running"
    sinfo
    return 0
  fi
  write_config
  start_munge
  # -c: a fresh controller forgets the jobs of its last life (a test cluster; jobs still "running" in a state
  # saved before the machine or session stopped would otherwise hold the node until they time out)
  if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
    /usr/sbin/slurmctld -c || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
  fi
  pid_alive "$RUN_DIR/slurmd.pid" || /usr/sbin/slurmd || die "slurmd did not start; see $LOG_DIR/slurmd.log"
  # reread the config in case the daemons were already running with an older one
  scontrol reconfigure > /dev/null 2>&1 || true
  local waited=0 state=""
  while [ "$waited" -lt "$START_TIMEOUT_S" ]; do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated | completing)
        say "up after ${waited}s: partition $PARTITION, node $state"
        sinfo
        return 0
        ;;
      down* | drain* | fail* | inval*)
        # ReturnToService=2 normally clears this; a node downed by hand needs an explicit resume
        scontrol update NodeName="$(hostname -s)" State=RESUME > /dev/null 2>&1 || true
        ;;
    esac
    sleep 1
    waited=$((waited + 1))
  done
  echo "--- slurmctld.log" >&2 && tail -15 "$LOG_DIR/slurmctld.log" >&2 || true
  echo "--- slurmd.log" >&2 && tail -15 "$LOG_DIR/slurmd.log" >&2 || true
  die "the node was not idle after ${START_TIMEOUT_S}s (state: '${state:-no answer from slurmctld}'); logs above"
}

wait_gone() {  # wait_gone PIDFILE NAME: wait up to 20 s for the process to exit, then SIGKILL it
  local pid
  # the daemon may remove its own pid file as it exits
  pid=$(cat "$1" 2> /dev/null) || return 0
  for _ in $(seq 20); do
    kill -0 "$pid" 2> /dev/null || { rm -f "$1"; return 0; }
    sleep 1
  done
  say "$2 (pid $pid) did not exit; killing it"
  kill -9 "$pid" 2> /dev/null || true
  rm -f "$1"
}

stop() {
  need_root "$@"
  if pid_alive "$RUN_DIR/slurmctld.pid"; then
    # stops slurmctld and every slurmd; running jobs are lost (the next start forgets all jobs)
    scontrol shutdown > /dev/null 2>&1 || kill "$(cat "$RUN_DIR/slurmctld.pid")" 2> /dev/null || true
  fi
  wait_gone "$RUN_DIR/slurmctld.pid" slurmctld
  pid_alive "$RUN_DIR/slurmd.pid" && kill "$(cat "$RUN_DIR/slurmd.pid")" 2> /dev/null || true
  wait_gone "$RUN_DIR/slurmd.pid" slurmd
  pid_alive "$MUNGE_RUN/munged.pid" && kill "$(cat "$MUNGE_RUN/munged.pid")" 2> /dev/null || true
  wait_gone "$MUNGE_RUN/munged.pid" munged
  say "stopped"
}

status() {
  local up=0
  for daemon in "$MUNGE_RUN/munged.pid munged" "$RUN_DIR/slurmctld.pid slurmctld" \
    "$RUN_DIR/slurmd.pid slurmd"; do
    set -- $daemon
    if pid_alive "$1"; then say "$2 running (pid $(cat "$1"))"; else say "$2 not running"; up=1; fi
  done
  [ "$up" -eq 0 ] && sinfo
  [ "$up" -eq 0 ] && healthy
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
