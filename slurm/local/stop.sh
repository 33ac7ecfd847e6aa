#!/usr/bin/env bash
# Stop the single-node SLURM started by slurm/local/start.sh (slurmd, slurmctld, slurmdbd,
# MariaDB; munged keeps running, other tools may use it). Packages stay installed: never purge
# libmunge2 (apt would remove libpmix2 and with it Open MPI). `--wipe` also deletes the state
# dir (job records, accounting database).
set -euo pipefail
STATE=${MEGARET_SLURM_STATE:-/tmp/megaret-slurm}
if [[ $EUID -ne 0 ]]; then
    echo "slurm/local/stop.sh must run as root" >&2
    exit 1
fi
stop_pidfile() {  # name pidfile
    [[ -s "$2" ]] || return 0
    local pid; pid=$(cat "$2")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
stop_pidfile slurmd "$STATE/run/slurmd.pid"
stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
stop_pidfile mariadb "$STATE/run/mariadb.pid"
if [[ ${1:-} == --wipe ]]; then
    for f in slurm.conf gres.conf slurmdbd.conf; do
        [[ -L /etc/slurm/$f ]] && rm -f "/etc/slurm/$f"
    done
    rm -rf "$STATE"
fi
echo "SLURM stopped (state $STATE${1:+, wiped})"
