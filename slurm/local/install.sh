#!/usr/bin/env bash
# Install a single-node SLURM with accounting (Debian slurm-wlm 22.05, munge, slurmdbd on a
# private MariaDB) and Open MPI. Idempotent: does nothing when everything is already there.
# Needs root (apt-get). Started by slurm/local/start.sh, stopped by slurm/local/stop.sh.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "slurm/local/install.sh must run as root (it uses apt-get)" >&2
    exit 1
fi

need=()
for cmd in munged slurmctld slurmd sbatch slurmdbd mariadbd mariadb-install-db mpirun; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[[ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h || -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ]] \
    || need+=(mpi.h)
if [[ ${#need[@]} -eq 0 ]]; then
    echo "SLURM, munge, slurmdbd, MariaDB and Open MPI are installed"
    exit 0
fi
echo "installing (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    munge slurmctld slurmd slurm-client slurmdbd mariadb-server libopenmpi-dev openmpi-bin
echo "installed"
