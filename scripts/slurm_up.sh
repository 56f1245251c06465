#!/usr/bin/env bash
# Bring up a single-node SLURM (munged + slurmctld + slurmd) on this machine, for tests and CI.
#
# Idempotent: exits 0 at once when `sinfo` answers and a node is idle.  Otherwise installs
# the Debian packages if missing, writes a minimal /etc/slurm/slurm.conf (one node named
# localhost on 127.0.0.1 with this machine's CPUs and memory, one partition `debug`), creates
# a munge key if missing, starts the daemons as root (slurmctld without the saved jobs of an
# earlier run) and waits (bounded) for the node to be idle.  Needs root.  An existing slurm.conf not written by this script is never replaced.
# The daemons it starts are recorded in /run/slurm/ccstae-started for scripts/slurm_down.sh,
# which stops only those.  Environment:
#   SLURM_UP_TIMEOUT   seconds to wait for an idle node (default 60)
#   SLURM_MEM_MARGIN   MiB of RAM kept back from SLURM (default 1024)
set -euo pipefail

TIMEOUT=${SLURM_UP_TIMEOUT:-60}
MARGIN=${SLURM_MEM_MARGIN:-1024}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm

log() { echo "slurm_up: $*" >&2; }

node_idle() {
    # `sinfo -h -o %T` prints one state per node group; "idle" or "mixed" both accept jobs
    sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed)'
}

if command -v sinfo >/dev/null 2>&1 && node_idle; then
    log "SLURM already up: $(sinfo -h -o '%P %T %D')"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "not root and SLURM is not running; start it as root (sudo $0)"
    exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v sinfo >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101 stops the packages' postinst from starting the daemons (no systemd here);
    # they are started below with this script's config
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get install -y -qq -o Dpkg::Options::=--force-confold \
        slurmctld slurmd slurm-client munge >/dev/null
    if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/slurm

cpus=$(nproc --all)
mem_total=$(free -m | awk '/^Mem:/ {print $2}')
real_mem=$((mem_total - MARGIN))
# a job that asks for no memory gets this much per CPU instead of the whole node, so that
# small jobs can share the node
def_mem=$((real_mem / cpus / 2))

conf="$CONF_DIR/slurm.conf"
new_conf=$(cat <<CONF
# Written by scripts/slurm_up.sh: single-node SLURM for tests. Do not use in production.
ClusterName=ccstae
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
# the node is described by configuration only: do not drain it if the probed hardware differs
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
# FORCE:4 lets up to 4 jobs share a core: the test suite keeps Dask worker jobs running
# while it submits batch jobs, which two exclusive cores could not hold at once
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)
header="# Written by scripts/slurm_up.sh"
if [[ -f $conf ]] && ! head -n1 "$conf" | grep -qF "$header"; then
    log "$conf exists and was not written by this script; not replacing it"
    log "start that site's SLURM instead, or move $conf away"
    exit 1
fi
if [[ ! -f $conf ]] || [[ "$(cat "$conf")" != "$new_conf" ]]; then
    log "writing $conf (CPUs=$cpus RealMemory=$real_mem)"
    printf '%s\n' "$new_conf" >"$conf"
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then
        scontrol reconfigure || true
    fi
fi
started=/run/slurm/ccstae-started

# munge: key, runtime dirs, daemon
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    echo munged >>"$started"
fi

if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
    log "starting slurmctld"
    # -c: start without the jobs saved by an earlier run of this test cluster.  A run that was
    # killed (e.g. a CI job stopped mid-suite) leaves its jobs in StateSaveLocation; recovered,
    # they hold the node "allocated" long after their processes are gone.
    slurmctld -c
    echo slurmctld >>"$started"
fi
if ! pgrep -x slurmd >/dev/null 2>&1; then
    log "starting slurmd"
    slurmd -N localhost
    echo slurmd >>"$started"
fi

deadline=$((SECONDS + TIMEOUT))
while ((SECONDS < deadline)); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    case $state in
        idle* | mixed*)
            log "SLURM up: $(sinfo -h -o '%P %T %D %c CPUs %m MB')"
            exit 0
            ;;
        drain* | down* | fail*)
            # left drained by an earlier run (e.g. an unclean stop): put it back into service
            scontrol update nodename=localhost state=resume 2>/dev/null || true
            ;;
    esac
    sleep 1
done
log "no idle node after ${TIMEOUT}s (state: ${state:-none}); see $LOG_DIR/*.log"
sinfo -R 2>/dev/null >&2 || true
exit 1
