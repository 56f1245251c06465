#!/usr/bin/env bash
# Stop the daemons that scripts/slurm_up.sh started (listed in /run/slurm/ccstae-started).
#
# Each is stopped through its pid file, never by name, and a SLURM this script did not start
# (e.g. a site's) is left alone.  Jobs still queued stay in slurmctld's saved state and resume
# at the next slurm_up.sh.  Safe to call when nothing runs (exit 0).
set -uo pipefail

TIMEOUT=${SLURM_DOWN_TIMEOUT:-30}
STARTED=/run/slurm/ccstae-started

log() { echo "slurm_down: $*" >&2; }

stop_pidfile() {
    # stop_pidfile NAME FILE: SIGTERM the pid in FILE and wait (bounded) until it is gone
    local name=$1 file=$2 pid
    if [[ ! -s $file ]]; then
        log "$name: no pid file $file"
        return 0
    fi
    pid=$(<"$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq "$((TIMEOUT * 4))"); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop in ${TIMEOUT}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

if [[ ! -s $STARTED ]]; then
    log "no daemons recorded in $STARTED: nothing started by slurm_up.sh, leaving SLURM alone"
    exit 0
fi
# slurmd first (it reports to slurmctld), munged last (both authenticate through it)
for daemon in slurmd slurmctld munged; do
    grep -qx "$daemon" "$STARTED" || continue
    case $daemon in
        slurmd) stop_pidfile slurmd /run/slurm/slurmd.pid ;;
        slurmctld) stop_pidfile slurmctld /run/slurm/slurmctld.pid ;;
        munged) stop_pidfile munged /run/munge/munged.pid ;;
    esac
done
rm -f "$STARTED"
log "stopped"
exit 0
