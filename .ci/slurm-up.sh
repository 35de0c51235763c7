#!/usr/bin/env bash
# Bring up a single-node SLURM (munged, slurmctld, slurmd) on 127.0.0.1 for `make test-slurm`.
#
# Everything lives in $SLURM_CI_DIR (default /tmp/sgdstab-slurm): slurm.conf, a private munge
# socket, state, logs, and daemons.pids (the PIDs `.ci/slurm-down.sh` stops, and only those).
# Needs root and apt (CI has both). Facts behind each setting: shared/notes/slurm-on-loopback.md.
# Prints `export SLURM_CONF=... PATH=...` lines to stdout for the caller to eval; fails with the
# reason (exit status != 0) whenever the cluster cannot be brought up, never skips.
set -euo pipefail
DIR=${SLURM_CI_DIR:-/tmp/sgdstab-slurm}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6818}
fail() { echo "slurm-up: cannot start SLURM: $*" >&2; exit 1; }
log() { echo "slurm-up: $*" >&2; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
started=$(date +%s.%N)

[ "$(id -u)" = 0 ] || fail "needs root (daemons run as root, packages come from apt); run as root as CI does"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail "slurmctld/slurmd/munge are not installed and there is no apt-get"
  log "installing slurmctld slurmd slurm-client munge"
  apt-get update -qq >&2 || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >&2 || fail "apt-get install of slurm/munge failed"
fi
installed=$(date +%s.%N)
if [ -s "$DIR/daemons.pids" ]; then
  fail "$DIR/daemons.pids exists: a cluster from an earlier run may still be up (run .ci/slurm-down.sh)"
fi
for port in "$CTLD_PORT" "$SLURMD_PORT"; do
  if ss -Hltn "sport = :$port" | grep -q .; then fail "port $port is already in use: $(ss -Hltnp "sport = :$port")"; fi
done

rm -rf "$DIR"
mkdir -p "$DIR"/{munge,state,spool,log,bin}
chmod 755 "$DIR"

# munge: a private key and socket, so a system munged (if any) is left alone.
chown munge:munge "$DIR/munge"
chmod 700 "$DIR/munge"
if [ -r /etc/munge/munge.key ]; then
  install -o munge -g munge -m 0400 /etc/munge/munge.key "$DIR/munge/munge.key"
else
  runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key" >&2 || fail "mungekey --create failed"
fi
chmod 711 "$DIR/munge"  # clients (root) must reach the socket; munged wants no group/other write
runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munge.seed" \
    || fail "munged did not start: $(tail -3 "$DIR/munge/munged.log" 2>/dev/null)"
echo "munged $(cat "$DIR/munge/munged.pid")" >> "$DIR/daemons.pids"

memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
cat > "$DIR/slurm.conf" <<CONF
ClusterName=sgdstab-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
MaxArraySize=1001
KillWait=1
# Preemption as on a real cluster: a job of partition urgent (higher PriorityTier) preempts jobs of
# debug. Each gets the signal of its --signal (submitit: USR2@90) at once (preempt_send_user_signal);
# one that has not requeued itself GraceTime seconds later is killed and requeued by SLURM.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$((memory / 2)) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=2
CONF
export SLURM_CONF="$DIR/slurm.conf"

# submitit reads job states only from sacct; without slurmdbd, sacct fails and a killed or
# cancelled job would never count as done. This sacct answers from squeue (MinJobAge keeps
# finished jobs listed for an hour) in the `JobID|State|NodeList` --parsable2 form submitit reads.
# squeue names a job by a passing flag where one is set (SIGNALING while a preemption's USR2 is
# delivered, CONFIGURING, ...); sacct, like this stand-in, gives the state beneath it. submitit
# takes any state it does not know for finished and stops waiting for the job's result, so a
# preempted job seen while SIGNALING would count as failed.
cat > "$DIR/bin/sacct" <<'SHIM'
#!/usr/bin/env bash
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=("$2"); shift 2 ;;
    --jobs=*) ids+=("${1#--jobs=}"); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
[ ${#ids[@]} -eq 0 ] && exit 0
joined=$(IFS=,; echo "${ids[*]}")
squeue -h -r -t all -j "$joined" -o '%i|%T|%N' 2>/dev/null | awk -F'|' -v OFS='|' '
  $2 ~ /^(SIGNALING|CONFIGURING|RESIZING|STAGE_OUT)$/ { $2 = "RUNNING" }
  $2 ~ /^(REQUEUE_FED|REQUEUE_HOLD)$/ { $2 = "REQUEUED" }
  { print }'
exit 0
SHIM
chmod 755 "$DIR/bin/sacct"

# The daemons bind to what their host name resolves to: where that is not loopback, give them
# their own UTS namespace named localhost.
prefix=()
if ! getent hosts "$(hostname)" | awk '{print $1}' | grep -q '^127\.'; then
  command -v unshare >/dev/null || fail "$(hostname) does not resolve to 127.x and unshare is missing"
  prefix=(unshare --uts sh -c 'hostname localhost && exec "$0" "$@"')
  log "$(hostname) does not resolve to 127.x: daemons run in a UTS namespace named localhost"
fi
"${prefix[@]}" slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -5 "$DIR/log/slurmctld.log" 2>/dev/null)"
for _ in $(seq 50); do [ -s "$DIR/slurmctld.pid" ] && break; sleep 0.1; done
[ -s "$DIR/slurmctld.pid" ] || fail "slurmctld wrote no PID file: $(tail -5 "$DIR/log/slurmctld.log" 2>/dev/null)"
echo "slurmctld $(cat "$DIR/slurmctld.pid")" >> "$DIR/daemons.pids"
"${prefix[@]}" slurmd -f "$SLURM_CONF" -N localhost || fail "slurmd did not start: $(tail -5 "$DIR/log/slurmd.log" 2>/dev/null)"
for _ in $(seq 50); do [ -s "$DIR/slurmd.pid" ] && break; sleep 0.1; done
[ -s "$DIR/slurmd.pid" ] || fail "slurmd wrote no PID file: $(tail -5 "$DIR/log/slurmd.log" 2>/dev/null)"
echo "slurmd $(cat "$DIR/slurmd.pid")" >> "$DIR/daemons.pids"
daemons_up=$(date +%s.%N)

# Ready when the node is idle and a job runs end to end.
for _ in $(seq 60); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1)
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || fail "the node is '${state:-unknown}', not idle after 30 s: $(tail -5 "$DIR/log/slurmd.log")"
out=$(timeout 60 srun -N1 -t 1 hostname 2>&1) || fail "srun hostname failed: $out"

# Loopback only: every socket of these daemons listens on 127.0.0.1.
pids=$(awk '{print $2}' "$DIR/daemons.pids" | paste -sd'|')
listening=$(ss -Hltnp | grep -E "pid=($pids)," || true)
[ -n "$listening" ] || fail "no listening socket of slurmctld/slurmd found by ss -ltnp"
if echo "$listening" | awk '{print $4}' | grep -vq '^127\.'; then
  fail "a daemon listens beyond loopback: $listening"
fi
ready=$(date +%s.%N)
log "up: install/check $(elapsed "$started" "$installed") s, daemons $(elapsed "$installed" "$daemons_up") s, first job $(elapsed "$daemons_up" "$ready") s; listening: $(echo "$listening" | awk '{print $4}' | paste -sd' ')"
echo "export SLURM_CONF=$SLURM_CONF"
echo "export PATH=$DIR/bin:\$PATH"
