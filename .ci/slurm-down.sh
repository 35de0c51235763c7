#!/usr/bin/env bash
# Stop the cluster of .ci/slurm-up.sh: cancel its jobs, then stop exactly the daemons whose PIDs
# it recorded in $SLURM_CI_DIR/daemons.pids (a PID is only signalled while it still runs the
# program recorded for it, so a recycled PID is never hit). A zombie counts as stopped: this
# machine kind's PID 1 reaps slowly.
set -uo pipefail
DIR=${SLURM_CI_DIR:-/tmp/sgdstab-slurm}
PIDS="$DIR/daemons.pids"
[ -f "$PIDS" ] || { echo "slurm-down: no $PIDS: nothing to stop" >&2; exit 0; }
started=$(date +%s.%N)
export SLURM_CONF="$DIR/slurm.conf"
if grep -q '^slurmctld ' "$PIDS"; then
  timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
  for _ in $(seq 20); do
    [ -z "$(timeout 5 squeue -h -t running,completing,suspended 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

running() {  # running PID NAME: the PID is alive, not a zombie, and is NAME
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
status=0
# Stop in reverse start order: slurmd, slurmctld, then munged (the others authenticate through it).
while read -r name pid; do
  running "$pid" "$name" || continue
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do running "$pid" "$name" || break; sleep 0.1; done
  if running "$pid" "$name"; then
    echo "slurm-down: $name ($pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
    sleep 0.5
    running "$pid" "$name" && { echo "slurm-down: $name ($pid) is still running" >&2; status=1; }
  fi
done < <(tac "$PIDS")
[ $status = 0 ] && rm -f "$PIDS"
echo "slurm-down: stopped in $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s" >&2
exit $status
