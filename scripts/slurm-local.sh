#!/usr/bin/env bash
# Single-node Slurm cluster on localhost, for CI / integration tests.
#
# Usage (as root):
#   scripts/slurm-local.sh [start]   install (if needed), configure and start munged,
#                                    [mariadbd, slurmdbd,] slurmctld, slurmd; wait
#                                    until the node is idle. Idempotent.
#   scripts/slurm-local.sh stop      stop the daemons started by this script
#   scripts/slurm-local.sh restart
#   scripts/slurm-local.sh status    sinfo / squeue summary
#
# Environment:
#   SLURM_LOCAL_DIR         state dir (spool, state save, logs, pid files);
#                           default /var/lib/slurm-local
#   SLURM_LOCAL_ACCOUNTING  1 (default): also run MariaDB + slurmdbd so that
#                           `sacct` works. 0: no accounting; `sacct` then fails
#                           with "Slurm accounting storage is disabled" and
#                           only squeue/scontrol (plus the jobcomp/filetxt
#                           file $SLURM_LOCAL_DIR/jobcomp.log) report job states.
#   SLURM_LOCAL_INSTALL     1 (default): apt-get install missing packages
#   SLURM_LOCAL_TIMEOUT     seconds to wait for each daemon / the node (default 30)
#   SLURM_LOCAL_CLEAN       1: start slurmctld with -c (forget saved jobs)
#   SLURM_LOCAL_PROBE       1 (default): after starting daemons, run a probe job
#                           (name slurm-local-probe) and wait for it to complete
#
# Config goes to /etc/slurm/slurm.conf (and slurmdbd.conf), the paths compiled
# into Debian's binaries, so sbatch/squeue/sacct/... need no SLURM_CONF.
# Tested on Debian 12: slurm-wlm 22.05.8-4+deb12u3, munge 0.5.15-2+deb12u1,
# mariadb-server 1:10.11.19-0+deb12u1, in a container without systemd
# (policy-rc.d forbids service starts, so daemons are started directly).
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-30}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
HOST=$(hostname -s)
CONF_CHANGED=0

log() { echo "slurm-local: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

# ---------------------------------------------------------------- install
install_pkgs() {
  local want=() c
  for c in slurmctld slurmd sbatch munged; do
    command -v "$c" >/dev/null || { want+=(slurm-wlm munge); break; }
  done
  if [ "$ACCOUNTING" = 1 ]; then
    command -v slurmdbd >/dev/null || want+=(slurmdbd)
    command -v mariadbd >/dev/null || want+=(mariadb-server)
  fi
  [ "${#want[@]}" -gt 0 ] || return 0
  [ "${SLURM_LOCAL_INSTALL:-1}" = 1 ] || die "missing packages: ${want[*]}"
  log "apt-get install ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${want[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${want[@]}" >/dev/null; } \
    || die "apt-get install ${want[*]} failed"
}

# ---------------------------------------------------------------- helpers
wait_for() { # description command...
  local what=$1; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "$what not up after ${TIMEOUT}s"; dump_logs; exit 1
    fi
    sleep 0.1
  done
}

# Running and not a zombie (a slow-reaping PID 1 can leave exited daemons as
# zombies for a while; kill -0 would still succeed on them).
proc_alive() { # pid
  local st
  st=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

pid_alive() { # pidfile comm
  local p
  [ -s "$1" ] || return 1
  p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && proc_alive "$p" && grep -qx "$2" "/proc/$p/comm" 2>/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

dump_logs() {
  local f
  for f in "$STATE_DIR"/slurmctld.log "$STATE_DIR"/slurmd.log "$STATE_DIR"/slurmdbd.log \
           "$STATE_DIR"/mariadb.log /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "===== $f (tail)" >&2; tail -n 40 "$f" >&2; }
  done
  echo "===== sinfo" >&2; sinfo -N -l >&2 || true
}

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  munge_ok && return 0
  # stale socket/pid from a killed munged
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged   # daemonizes
  wait_for munged munge_ok
}

# ---------------------------------------------------------------- mariadb + slurmdbd
db_ok() { mariadb-admin ping; }

start_mariadb() {
  mkdir -p /run/mysqld && chown mysql:root /run/mysqld
  if ! db_ok >/dev/null 2>&1; then
    if [ ! -d /var/lib/mysql/mysql ]; then
      log "initialising MariaDB data dir"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE_DIR/mariadb-install.log" 2>&1
    fi
    log "starting mariadbd"
    # local socket only (/run/mysqld/mysqld.sock); no TCP port needed
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
      --innodb-buffer-pool-size=64M </dev/null >>"$STATE_DIR/mariadb.log" 2>&1 &
    wait_for mariadbd db_ok
  fi
  # root connects via unix_socket auth
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_dbd_conf() {
  local tmp
  tmp=$(mktemp "$CONF_DIR/.slurmdbd.conf.XXXXXX")
  cat >"$tmp" <<EOF
# Written by slurm-local.sh - single-node test cluster. Do not edit.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=${STATE_DIR}/slurmdbd.log
PidFile=${STATE_DIR}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$tmp"   # slurmdbd refuses a group/world-readable config
  if [ -f "$DBD_CONF" ] && cmp -s "$tmp" "$DBD_CONF"; then rm -f "$tmp"
  else mv -f "$tmp" "$DBD_CONF"; stop_one "$STATE_DIR/slurmdbd.pid" slurmdbd; fi
}

start_slurmdbd() {
  write_dbd_conf
  pid_alive "$STATE_DIR/slurmdbd.pid" slurmdbd && return 0
  log "starting slurmdbd"
  slurmdbd
  wait_for slurmdbd port_open 6819
}

# ---------------------------------------------------------------- slurm.conf
write_conf() {
  local cpus mem_total margin real_mem tmp acct
  cpus=$(nproc)
  mem_total=$(free -m | awk '/^Mem:/ {print $2}')
  # keep ~5% (at least 256 MB) back so RealMemory <= what slurmd detects
  margin=$(( mem_total / 20 )); [ "$margin" -ge 256 ] || margin=256
  real_mem=$(( mem_total - margin )); [ "$real_mem" -ge 100 ] || real_mem=100

  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi

  tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
  cat >"$tmp" <<EOF
# Written by slurm-local.sh - single-node test cluster. Do not edit.
ClusterName=local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start
# again (default 120 s, which makes requeue tests slow).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups in containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
JobRequeue=1
# Reject at sbatch time jobs that can never run here (e.g. more CPUs than the
# node has) instead of leaving them PENDING with Reason=PartitionConfig.
EnforcePartLimits=ALL

SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE_DIR}/state
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldLogFile=${STATE_DIR}/slurmctld.log
SlurmdLogFile=${STATE_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# Scheduling: start jobs as soon as possible (FIFO).
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,batch_sched_delay=0,sched_min_interval=0
# A job whose afterok dependency failed is cancelled (state CANCELLED)
# instead of pending forever (Reason=DependencyNeverSatisfied).
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
# Keep finished jobs visible to squeue -t all / scontrol show job for a day.
MinJobAge=86400
KillWait=5
InactiveLimit=0

${acct}
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE_DIR}/jobcomp.log

NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  chmod 644 "$tmp"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$CONF"; CONF_CHANGED=1
  fi
}

# ---------------------------------------------------------------- slurmctld/slurmd
slurmd_start_time() {
  local t
  t=$(scontrol -o show node "$HOST" 2>/dev/null | grep -oE 'SlurmdStartTime=[^ ]+' | cut -d= -f2)
  date -d "$t" +%s 2>/dev/null || echo 0
}

node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1; }

start_slurm() {
  local st deadline started=0
  if [ "$CONF_CHANGED" = 1 ]; then
    # Some settings (plugins, AuthInfo) need a restart, not just reconfigure.
    # Jobs survive: slurmctld saves state, slurmstepd keeps running steps.
    stop_one "$STATE_DIR/slurmd.pid" slurmd
    stop_one "$STATE_DIR/slurmctld.pid" slurmctld
  fi
  if ! pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    if [ "${SLURM_LOCAL_CLEAN:-0}" = 1 ]; then slurmctld -c; else slurmctld; fi
    started=1
  fi
  wait_for slurmctld scontrol ping
  local slurmd_t0=0
  if ! pid_alive "$STATE_DIR/slurmd.pid" slurmd; then
    log "starting slurmd"
    slurmd_t0=$(date +%s)
    slurmd
    started=1
  fi

  deadline=$(( $(date +%s) + TIMEOUT ))
  while :; do
    st=$(node_state || true)
    case "$st" in
      idle|mixed|allocated|completing)
        # After a restart slurmctld reports the node state it saved; wait
        # until the new slurmd has really registered (jobs start only then).
        [ "$(slurmd_start_time)" -ge "$slurmd_t0" ] && break ;;
      down*|drain*|fail*|*'*')   # '*' suffix = not responding
        # ReturnToService=2 should handle this; be explicit anyway.
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "node $HOST not idle after ${TIMEOUT}s (state: '${st:-?}')"
      dump_logs; exit 1
    fi
    sleep 0.2
  done
  if [ "$started" = 1 ] && [ "${SLURM_LOCAL_PROBE:-1}" = 1 ]; then
    # End-to-end check. Also absorbs the ~3 s after a slurmctld start during
    # which it does not schedule yet, so the caller's first job starts at once.
    # (sbatch --wait polls too slowly: ~10 s.)
    log "running probe job"
    local id pst
    id=$(sbatch --parsable -J slurm-local-probe -o /dev/null -D / --wrap true) \
      || { log "probe sbatch failed"; dump_logs; exit 1; }
    deadline=$(( $(date +%s) + TIMEOUT ))
    while :; do
      pst=$(squeue -h -t all -j "$id" -o %T 2>/dev/null || true)
      [ "$pst" = COMPLETED ] && break
      case "$pst" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL)
        log "probe job $id ended $pst"; dump_logs; exit 1 ;;
      esac
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "probe job $id not done after ${TIMEOUT}s (state '$pst')"; dump_logs; exit 1
      fi
      sleep 0.2
    done
  fi
  if [ "$ACCOUNTING" = 1 ]; then
    # slurmctld registers the cluster in slurmdbd by itself; wait for it.
    wait_for "cluster registration" \
      bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx local"
  fi
  log "ready: node $HOST $st (accounting=$ACCOUNTING, conf $CONF, state $STATE_DIR)"
}

stop_one() { # pidfile comm
  local p
  pid_alive "$1" "$2" || return 0
  p=$(cat "$1")
  log "stopping $2 (pid $p)"
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 100); do proc_alive "$p" || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
}

# ---------------------------------------------------------------- commands
cmd_start() {
  install_pkgs
  mkdir -p "$CONF_DIR" "$STATE_DIR/spool" "$STATE_DIR/state"
  start_munge
  if [ "$ACCOUNTING" = 1 ]; then start_mariadb; start_slurmdbd; fi
  write_conf
  start_slurm
}

cmd_stop() {
  stop_one "$STATE_DIR/slurmd.pid" slurmd
  stop_one "$STATE_DIR/slurmctld.pid" slurmctld
  stop_one "$STATE_DIR/slurmdbd.pid" slurmdbd
  if pid_alive /run/mysqld/mysqld.pid mariadbd; then
    log "stopping mariadbd"
    mariadb-admin shutdown >/dev/null 2>&1 || stop_one /run/mysqld/mysqld.pid mariadbd
  fi
  stop_one /run/munge/munged.pid munged
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) sinfo -N -l; squeue -a -t all ;;
  *) echo "usage: $0 [start|stop|restart|status]" >&2; exit 2 ;;
esac
