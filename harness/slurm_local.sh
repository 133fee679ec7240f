#!/usr/bin/env bash
# slurm_local.sh -- a real single-node Slurm cluster (with accounting) on loopback.
#
# Usage: bash harness/slurm_local.sh {install|start|status|stop}
#   install  apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server (if missing)
#   start    install if needed, write configs, cold-start munged, mariadbd, slurmdbd, slurmctld,
#            slurmd; wait for the node to be idle and sacct to answer. No-op if already healthy.
#   status   print daemon/node state; exit 0 if healthy, 1 otherwise
#   stop     stop the daemons this script started (by pid file); exit 0 even if none run
#
# Needs: root, Debian 12 (no systemd needed). Config goes to the default /etc/slurm/slurm.conf,
# so callers need no SLURM_CONF. Env: SLURM_LOCAL_STATE (default /var/lib/slurm-local) holds
# state, logs, pid files and the MariaDB datadir; SLURM_LOCAL_TIMEOUT (default 60 s) bounds waits.
# Everything listens on 127.0.0.1 only (6817 slurmctld, 6818 slurmd, 6819 slurmdbd; MariaDB: socket).
# See shared/reference/slurm-on-one-machine.md for why each setting is here.
set -euo pipefail

export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH   # daemons live in /usr/sbin
STATE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
ETC=/etc/slurm
export SLURM_CONF=$ETC/slurm.conf            # we write the default path; override any caller value
CLUSTER=local
HOST=$(hostname -s)
LOG=$STATE/log RUN=$STATE/run
MYSQL_SOCK=/run/mysqld/mysqld.sock
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# daemon name -> pid file (stop order: reverse of start order)
declare -A PIDFILE=([munged]=/run/munge/munged.pid [mariadbd]=/run/mysqld/mariadbd.pid
  [slurmdbd]=$RUN/slurmdbd.pid [slurmctld]=$RUN/slurmctld.pid [slurmd]=$RUN/slurmd.pid)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
declare -A DLOG=([munged]=/var/log/munge/munged.log [mariadbd]=$LOG/mariadbd.err
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

# pid_of NAME: the pid in NAME's pid file if that process is alive and really is NAME.
pid_of() {
  local f=${PIDFILE[$1]} pid
  [[ -s $f ]] || return 1
  pid=$(tr -dc 0-9 <"$f"); [[ -n $pid ]] && alive "$pid" || return 1
  [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$1"* ]] || return 1
  echo "$pid"
}

do_install() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [[ $EUID -eq 0 ]] || die "must run as root to install ${missing[*]}"
  log "installing ${missing[*]}"
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

# Healthy = all five daemons alive, munge works, ctld answers, node usable, sacct answers.
healthy() {
  local d state
  for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || return 1
  scontrol ping 2>/dev/null | grep -q UP || return 1
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null) || return 1
  [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
  sacct -n -X -S now-1minutes >/dev/null 2>&1
}

node_idle() { [[ $(sinfo -h -N -n "$HOST" -o %T 2>/dev/null) == idle ]]; }
cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }
mysql_up() { mariadb --socket=$MYSQL_SOCK -e 'select 1'; }
munge_ok() { munge -n | unmunge; }

# write_configs FIRST_JOB_ID
write_configs() {
  # Node line from the hardware, with ~85% of RealMemory (the full amount makes the node drain).
  local node mem
  node=$(slurmd -C | head -n1) || die "slurmd -C failed"
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 85 / 100))/; s/^NodeName=[^ ]*/NodeName=$HOST/" <<<"$node")
  cat >"$ETC/slurm.conf" <<EOF
# Written by harness/slurm_local.sh -- single-node loopback cluster; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
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
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
# Written by harness/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
CommunicationParameters=NoInAddrAny
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
EOF
  chmod 600 "$ETC/slurmdbd.conf"; chmod 644 "$ETC/slurm.conf"
}

start_munge() {
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
  if ! munge_ok >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start" munged
    wait_for 10 munge_ok || fail "munge -n | unmunge fails" munged
  fi
}

start_mariadb() {
  local data=$STATE/mysql
  mkdir -p /run/mysqld "$data"; touch "${DLOG[mariadbd]}"   # mariadbd writes these as user mysql
  chown mysql:mysql /run/mysqld "$data" "${DLOG[mariadbd]}"
  if [[ ! -d $data/mysql ]]; then
    log "initialising MariaDB datadir $data"
    mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || { tail -n 25 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  # setsid: fully detached; --skip-networking: unix socket only, no TCP port at all.
  setsid mariadbd --no-defaults --user=mysql --datadir="$data" --socket=$MYSQL_SOCK \
    --skip-networking --pid-file="${PIDFILE[mariadbd]}" --log-error="${DLOG[mariadbd]}" \
    </dev/null >/dev/null 2>&1 &
  wait_for 30 mysql_up || fail "mariadbd did not come up" mariadbd
}

# Cold start: pick FirstJobId, then drop the accounting DB (slurmdbd recreates it). Job ids must
# never repeat across cold starts (a reused submitit folder would return an old result, pitfall 10):
# start from the clock, or past the highest id the old DB recorded if that is higher.
reset_accounting() {
  local last first=$(( $(date +%s) % 60000000 + 1000 ))
  last=$(mariadb --socket=$MYSQL_SOCK -N -e "SELECT MAX(id_job) FROM slurm_acct_db.${CLUSTER}_job_table" 2>/dev/null) || last=
  [[ $last =~ ^[0-9]+$ ]] && ((last >= first && last < 67000000)) && first=$((last + 1))
  mariadb --socket=$MYSQL_SOCK -e 'DROP DATABASE IF EXISTS slurm_acct_db' || fail "cannot drop slurm_acct_db" mariadbd
  echo "$first"
}

do_start() {
  [[ $EUID -eq 0 ]] || die "must run as root (slurmd and the daemons need it)"
  if healthy; then log "already running and healthy"; return 0; fi
  do_install
  do_stop >/dev/null                    # clear any half-running leftovers: always a cold start
  local t0=$SECONDS
  getent hosts "$HOST" >/dev/null || { log "adding '127.0.0.1 $HOST' to /etc/hosts"; echo "127.0.0.1 $HOST" >>/etc/hosts; }
  mkdir -p "$ETC" "$LOG" "$RUN" "$STATE/ctld" "$STATE/slurmd"
  rm -rf "${STATE:?}/ctld/"* "${STATE:?}/slurmd/"*   # cold start: no old job state
  start_munge
  start_mariadb
  local first_id; first_id=$(reset_accounting) || exit 1
  write_configs "$first_id"
  slurmdbd || fail "slurmdbd failed to start" slurmdbd
  wait_up 20 slurmdbd sacctmgr -n list cluster || fail "slurmdbd does not answer" slurmdbd mariadbd
  slurmctld -c || fail "slurmctld failed to start" slurmctld
  wait_up 20 slurmctld bash -c 'scontrol ping | grep -q UP' || fail "slurmctld does not answer" slurmctld
  slurmd || fail "slurmd failed to start" slurmd
  wait_up "$TIMEOUT" slurmd node_idle || fail "node $HOST not idle: $(sinfo -h -N -o '%T %E' 2>&1)" slurmd slurmctld
  wait_for "$TIMEOUT" cluster_registered || fail "cluster '$CLUSTER' not registered in slurmdbd" slurmctld slurmdbd
  healthy || fail "cluster came up but the health check fails"
  log "cluster up in $((SECONDS - t0)) s (logs in $LOG)"
}

do_status() {
  local d pid rc=0
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
  # Job step daemons orphaned by slurmd (only if cancelling failed above).
  for pid in $(pgrep -x slurmstepd || true); do kill -KILL "$pid" 2>/dev/null || true; done
  ((${#pids[@]})) || echo "nothing running"
  return 0
}

# start/stop/install run one at a time (parallel test workers may all call start). flock -o keeps
# the lock fd out of the daemons this run starts.
if [[ ${1:-} =~ ^(start|stop|install)$ && -z ${SLURM_LOCAL_LOCKED:-} ]]; then
  [[ $EUID -eq 0 ]] || die "must run as root"
  SLURM_LOCAL_LOCKED=1 exec flock -o -w 600 /run/slurm_local.lock bash "$0" "$@"
fi

case ${1:-} in
  install) do_install ;;
  start) do_start ;;
  status) do_status ;;
  stop) do_stop ;;
  *) echo "usage: $0 {install|start|status|stop}   (env: SLURM_LOCAL_STATE, SLURM_LOCAL_TIMEOUT)" >&2; exit 2 ;;
esac
