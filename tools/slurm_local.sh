#!/usr/bin/env bash
# slurm_local.sh -- a self-contained single-node Slurm test cluster (with accounting) on loopback.
#
# Usage: bash tools/slurm_local.sh {install|start|status|stop|conf}
#   install  apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server (only those missing;
#            Debian packages, their own files in /etc and /usr; no service is started)
#   start    install if needed, then cold-start this cluster's own munged, mariadbd, slurmdbd, slurmctld and slurmd;
#            wait for the node to be idle and sacct to answer. No-op if already healthy.
#   status   print daemon/node state; exit 0 if healthy, 1 otherwise
#   stop     stop the daemons this script started (pid files in its prefix, checked); exit 0 even if none run
#   conf     print the SLURM_CONF path callers must export (nothing else is needed to use the cluster)
#
# Self-contained: everything it writes lives under one prefix, $HARNESS_SLURM_PREFIX (default
# /var/tmp/harness-slurm): etc/slurm.conf + etc/slurmdbd.conf (callers: export SLURM_CONF=<prefix>/etc/slurm.conf),
# state, spool, logs, pid files, its own munged (own socket; the package's /etc/munge/munge.key is used read-only
# if present, else a key of its own in the prefix) and its own MariaDB (datadir and socket in the prefix, no TCP,
# database harness_slurm_acct). Nothing in /etc is written; the default /etc/slurm/slurm.conf is never read.
# It refuses to touch what it did not create: a prefix without its marker file, Slurm daemons it did not start
# (the ports 6817-6819 are Slurm's defaults), and any MariaDB other than its own (it only ever uses its socket).
# Needs: root, Debian 12 (no systemd needed), `hostname -s` resolvable (it says so if not; it does not edit
# /etc/hosts). Env: HARNESS_SLURM_PREFIX; SLURM_LOCAL_TIMEOUT (default 60 s) bounds waits.
# See shared/reference/slurm-on-one-machine.md for why each setting is here.
set -euo pipefail

export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH   # daemons live in /usr/sbin
PREFIX=${HARNESS_SLURM_PREFIX:-/var/tmp/harness-slurm}
if [[ $PREFIX != /* || $PREFIX == / || $PREFIX == *[[:space:]]* ]]; then
  echo "slurm_local: HARNESS_SLURM_PREFIX=$PREFIX must be an absolute path without spaces, not /" >&2; exit 2
fi
PREFIX=${PREFIX%/}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
MARKER=$PREFIX/.harness-slurm-local   # written when this script creates the prefix; required before touching it
ETC=$PREFIX/etc
export SLURM_CONF=$ETC/slurm.conf       # this cluster's config, whatever the caller had
CLUSTER=harness
DB_NAME=harness_slurm_acct
HOST=$(hostname -s)
LOG=$PREFIX/log RUN=$PREFIX/run STATE=$PREFIX/state
MUNGE_DIR=$PREFIX/munge                 # owned by munge: socket, pid, log, seed (and the key if it makes one)
MUNGE_SOCK=$MUNGE_DIR/munge.socket
DB_DIR=$PREFIX/mysql DB_RUN=$PREFIX/mysqld   # datadir; socket + pid (owned by mysql)
DB_SOCK=$DB_RUN/mysqld.sock
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
declare -A PIDFILE=([munged]=$MUNGE_DIR/munged.pid [mariadbd]=$DB_RUN/mariadbd.pid
  [slurmdbd]=$RUN/slurmdbd.pid [slurmctld]=$RUN/slurmctld.pid [slurmd]=$RUN/slurmd.pid)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop in reverse
declare -A DLOG=([munged]=$MUNGE_DIR/munged.log [mariadbd]=$LOG/mariadbd.err
  [slurmdbd]=$LOG/slurmdbd.log [slurmctld]=$LOG/slurmctld.log [slurmd]=$LOG/slurmd.log)

log() { echo "slurm_local: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the tail of a daemon's log (or of all of them) and exit non-zero.
fail() {
  local msg=$1; shift
  log "ERROR: $msg"
  for d in "${@:-${DAEMONS[@]}}"; do
    [[ -f ${DLOG[$d]} ]] || continue
    echo "----- ${DLOG[$d]} (last 25 lines) -----" >&2; tail -n 25 "${DLOG[$d]}" >&2
  done
  log "logs: $(for d in "${@:-${DAEMONS[@]}}"; do printf '%s ' "${DLOG[$d]}"; done)"
  exit 1
}

# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds; return 1 on timeout.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
}

# wait_up SECONDS DAEMON CMD...: like wait_for, but give up early once DAEMON has been dead for 3 s.
wait_up() {
  local deadline=$((SECONDS + $1)) grace=$((SECONDS + 3)) d=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    ((SECONDS < grace)) || pid_of "$d" >/dev/null || { log "$d is not running"; return 1; }
    sleep 0.2
  done
}

# alive PID: process exists and is not a zombie (PID 1 here may reap orphans late).
alive() { local st; st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) && [[ -n $st && $st != Z ]]; }

# ours PID: the process was started by this script for this prefix (its command line or environment names it).
ours() {
  { tr '\0' '\n' </proc/"$1"/cmdline; } 2>/dev/null | grep -qF "$PREFIX/" && return 0
  { tr '\0' '\n' </proc/"$1"/environ; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"
}

# pid_of NAME: the pid in NAME's pid file (in the prefix) if that process is alive, is NAME and is ours.
pid_of() {
  local f=${PIDFILE[$1]} pid
  [[ -s $f ]] || return 1
  pid=$(tr -dc 0-9 <"$f"); [[ -n $pid ]] && alive "$pid" || return 1
  [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$1"* ]] || return 1
  ours "$pid" || return 1
  echo "$pid"
}

# The prefix is ours (marker) or absent/empty (then claimed). Anything else: refuse before touching it.
claim_prefix() {
  if [[ -e $PREFIX && ! -f $MARKER ]]; then
    if [[ ! -d $PREFIX || -n $(ls -A "$PREFIX" 2>/dev/null) ]]; then
      die "$PREFIX exists and was not created by this script (no $MARKER); refusing to touch it. Choose another" \
          "prefix with HARNESS_SLURM_PREFIX=/some/new/dir"
    fi
  fi
  [[ ${1:-} == check ]] && return 0
  mkdir -p "$PREFIX"; chmod 755 "$PREFIX"
  [[ -f $MARKER ]] || echo "created by tools/slurm_local.sh on $(date -Is); safe to delete after 'stop'" >"$MARKER"
}

# Slurm daemons running that this script did not start (another cluster on this machine): refuse.
foreign_slurm() {
  local d pid out=()
  for d in slurmctld slurmd slurmdbd; do
    for pid in $(pgrep -x "$d" || true); do   # zombies and exiting processes (ours, just stopped) do not count
      alive "$pid" && ! ours "$pid" && alive "$pid" || continue
      out+=("$d (pid $pid: $({ tr '\0' ' ' </proc/"$pid"/cmdline; } 2>/dev/null))")
    done
  done
  ((${#out[@]})) || return 1
  printf '%s\n' "${out[@]}"
}

do_install() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [[ $EUID -eq 0 ]] || die "must run as root to install ${missing[*]}"
  log "installing Debian packages ${missing[*]} (no service is started)"
  # Keep package postinst scripts from starting services (no init system here anyway).
  local policy_created=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy_created=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-cache show slurmctld >/dev/null 2>&1 || apt-get update -q >&2 || die "apt-get update failed"
  local rc=0
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || rc=$?
  ((policy_created)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install ${missing[*]} failed (rc=$rc)"
}

munge_ok() { munge --socket="$MUNGE_SOCK" -n | unmunge --socket="$MUNGE_SOCK"; }
mysql_up() { mariadb --no-defaults --socket="$DB_SOCK" -e 'select 1'; }

# Healthy = all five daemons ours and alive, munge works, ctld answers, node usable, sacct answers.
healthy() {
  local d state
  [[ -f $MARKER && -f $SLURM_CONF ]] || return 1
  for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
  munge_ok >/dev/null 2>&1 || return 1
  scontrol ping 2>/dev/null | grep -q UP || return 1
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null) || return 1
  [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
  sacct -n -X -S now-1minutes >/dev/null 2>&1
}

node_idle() { [[ $(sinfo -h -N -n "$HOST" -o %T 2>/dev/null) == idle ]]; }
cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

# write_configs FIRST_JOB_ID
write_configs() {
  # Node line from the hardware, with ~85% of RealMemory (the full amount makes the node drain).
  local node mem
  node=$(slurmd -C | head -n1) || die "slurmd -C failed"
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 85 / 100))/; s/^NodeName=[^ ]*/NodeName=$HOST/" <<<"$node")
  cat >"$ETC/slurm.conf" <<EOF
# Written by tools/slurm_local.sh -- single-node loopback test cluster under $PREFIX; edits are overwritten.
# Use it with: export SLURM_CONF=$ETC/slurm.conf
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
PlugStackConfig=$ETC/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
ReturnToService=2
# submitit ignores SIGTERM, so scancel'ed jobs linger KillWait seconds (default 30) before SIGKILL,
# and the scheduler holds new jobs back while one is completing.
KillWait=5
FirstJobId=$1
MaxJobId=67043328
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# clients authenticate to slurmdbd with this, not AuthInfo: the same munged
AccountingStoragePass=socket=$MUNGE_SOCK
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
# Written by tools/slurm_local.sh (test cluster under $PREFIX)
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
CommunicationParameters=NoInAddrAny
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=root
EOF
  : >"$ETC/plugstack.conf"   # no SPANK plugins (not the package's /etc/slurm/plugstack.conf)
  chmod 600 "$ETC/slurmdbd.conf"; chmod 644 "$ETC/slurm.conf" "$ETC/plugstack.conf"
}

start_munge() {
  local key=/etc/munge/munge.key
  mkdir -p "$MUNGE_DIR"; chown munge:munge "$MUNGE_DIR"; chmod 755 "$MUNGE_DIR"   # munged: socket dir open to all
  if [[ ! -s $key ]]; then   # no package key: one of our own, in the prefix (never one in /etc)
    key=$MUNGE_DIR/munge.key
    [[ -s $key ]] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; chown munge:munge "$key"; chmod 0400 "$key"; }
  fi
  pid_of munged >/dev/null && munge_ok >/dev/null 2>&1 && return 0
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCK" --key-file="$key" --pid-file="${PIDFILE[munged]}" \
    --log-file="${DLOG[munged]}" --seed-file="$MUNGE_DIR/munged.seed" || fail "munged did not start" munged
  wait_for 10 munge_ok || fail "munge -n | unmunge fails on $MUNGE_SOCK" munged
}

start_mariadb() {
  mkdir -p "$DB_RUN" "$DB_DIR"; touch "${DLOG[mariadbd]}"   # mariadbd writes these as user mysql
  chown mysql:mysql "$DB_RUN" "$DB_DIR" "${DLOG[mariadbd]}"
  if [[ ! -d $DB_DIR/mysql ]]; then
    log "initialising this cluster's MariaDB datadir $DB_DIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || { tail -n 25 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  # setsid: fully detached; --no-defaults: no /etc/mysql config; --skip-networking: its own unix socket only.
  setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCK" \
    --skip-networking --pid-file="${PIDFILE[mariadbd]}" --log-error="${DLOG[mariadbd]}" \
    </dev/null >/dev/null 2>&1 &
  wait_for 30 mysql_up || fail "mariadbd did not come up" mariadbd
}

# Cold start: pick FirstJobId, then drop this cluster's accounting DB (slurmdbd recreates it), in its own MariaDB
# only. Job ids must never repeat across cold starts (a reused submitit folder would return an old result,
# pitfall 10): start from the clock, or past the highest id the old DB recorded if that is higher.
reset_accounting() {
  local last first=$(( $(date +%s) % 60000000 + 1000 ))
  pid_of mariadbd >/dev/null || fail "this cluster's mariadbd is not running" mariadbd
  last=$(mariadb --no-defaults --socket="$DB_SOCK" -N -e "SELECT MAX(id_job) FROM $DB_NAME.${CLUSTER}_job_table" 2>/dev/null) || last=
  [[ $last =~ ^[0-9]+$ ]] && ((last >= first && last < 67000000)) && first=$((last + 1))
  mariadb --no-defaults --socket="$DB_SOCK" -e "DROP DATABASE IF EXISTS $DB_NAME" || fail "cannot drop $DB_NAME" mariadbd
  echo "$first"
}

do_start() {
  [[ $EUID -eq 0 ]] || die "must run as root (slurmd and the daemons need it)"
  claim_prefix check
  if healthy; then log "already running and healthy (SLURM_CONF=$SLURM_CONF)"; return 0; fi
  local foreign
  if foreign=$(foreign_slurm); then
    die "Slurm daemons this script did not start are running; refusing to start a second cluster beside them:"$'\n'"$foreign"
  fi
  getent hosts "$HOST" >/dev/null || die "the host name '$HOST' does not resolve, and Slurm needs it to; add the" \
    "line '127.0.0.1 $HOST' to /etc/hosts yourself (this script does not edit /etc)"
  do_install
  claim_prefix
  do_stop >/dev/null                    # clear any half-running leftovers of ours: always a cold start
  local t0=$SECONDS
  mkdir -p "$ETC" "$LOG" "$RUN" "$STATE/ctld" "$STATE/slurmd"
  rm -rf "${STATE:?}/ctld/"* "${STATE:?}/slurmd/"*   # cold start: no old job state
  start_munge
  start_mariadb
  local first_id; first_id=$(reset_accounting) || exit 1
  write_configs "$first_id"
  MYSQL_UNIX_PORT=$DB_SOCK slurmdbd || fail "slurmdbd failed to start" slurmdbd   # libmariadb: its socket, not /run/mysqld
  wait_up 20 slurmdbd sacctmgr -n list cluster || fail "slurmdbd does not answer" slurmdbd mariadbd
  slurmctld -c || fail "slurmctld failed to start" slurmctld
  wait_up 20 slurmctld bash -c 'scontrol ping | grep -q UP' || fail "slurmctld does not answer" slurmctld
  slurmd || fail "slurmd failed to start" slurmd
  wait_up "$TIMEOUT" slurmd node_idle || fail "node $HOST not idle: $(sinfo -h -N -o '%T %E' 2>&1)" slurmd slurmctld
  wait_for "$TIMEOUT" cluster_registered || fail "cluster '$CLUSTER' not registered in slurmdbd" slurmctld slurmdbd
  healthy || fail "cluster came up but the health check fails"
  log "cluster up in $((SECONDS - t0)) s under $PREFIX; use it with: export SLURM_CONF=$SLURM_CONF"
}

do_status() {
  local d pid rc=0
  echo "prefix: $PREFIX  SLURM_CONF=$SLURM_CONF"
  for d in "${DAEMONS[@]}"; do
    if pid=$(pid_of "$d"); then echo "$d: running (pid $pid)"; else echo "$d: NOT running"; rc=1; fi
  done
  if ((rc == 0)); then sinfo -N -o '%N %P %T %C %m %E' 2>&1 || rc=1; fi
  healthy || rc=1
  ((rc == 0)) && echo "healthy" || echo "NOT healthy (logs: $LOG)"
  return $rc
}

do_stop() {
  local i d pid pids=()
  [[ -f $MARKER ]] || { echo "nothing running (no $MARKER)"; return 0; }
  # Cancel jobs first so no job step outlives slurmd.
  if pid_of slurmctld >/dev/null && [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
    echo "cancelling jobs: $(squeue -h -o %A | tr '\n' ' ')"
    squeue -h -o %A | xargs -r scancel 2>/dev/null || true
    wait_for 20 bash -c '[[ -z $(squeue -h -o %A) ]]' || echo "warning: jobs still listed after 20 s"
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do      # reverse start order
    d=${DAEMONS[i]}
    pid=$(pid_of "$d") || continue
    echo "stopping $d (pid $pid)"; kill -TERM "$pid" 2>/dev/null || true
    # wait up to 15 s, then SIGKILL
    wait_for 15 eval "! alive $pid" || { kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; }
    pids+=("$pid")
  done
  # Job step daemons of this cluster orphaned by slurmd (only if cancelling failed above).
  for pid in $(pgrep -x slurmstepd || true); do ours "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
  ((${#pids[@]})) || echo "nothing running"
  return 0
}

# start/stop/install run one at a time (parallel test workers may all call start). flock -o keeps
# the lock fd out of the daemons this run starts. The lock sits beside the prefix, not in /run.
if [[ ${1:-} =~ ^(start|stop|install)$ && -z ${SLURM_LOCAL_LOCKED:-} ]]; then
  [[ $1 == install ]] || claim_prefix check   # refuse a foreign prefix before anything, root or not
  [[ $EUID -eq 0 ]] || die "must run as root"
  SLURM_LOCAL_LOCKED=1 exec flock -o -w 600 "$PREFIX.lock" bash "$0" "$@"
fi

case ${1:-} in
  install) do_install ;;
  start) do_start ;;
  status) do_status ;;
  stop) do_stop ;;
  conf) echo "$SLURM_CONF" ;;
  *) echo "usage: $0 {install|start|status|stop|conf}   (env: HARNESS_SLURM_PREFIX, SLURM_LOCAL_TIMEOUT)" >&2; exit 2 ;;
esac
