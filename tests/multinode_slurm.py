"""A real SLURM across the simulated hosts of tests/hosts.py (root only).

`slurm_cluster(hosts, root)` writes its own slurm.conf (own cluster name, state, spool, pid and
log paths under `root`, non-default ports 16817/16818, so a single-node SLURM started by
slurm/local/start.sh on the same machine is untouched) and starts slurmctld on the first host and
one slurmd per host, each with its own NodeName, NodeAddr (its veth address) and spool directory
(`SlurmdSpoolDir=.../%n`). Clients find it through SLURM_CONF and must run on a host
(`Host.run`): the first host is the login node. munged (machine-wide, reached through its unix
socket from every namespace) is started if it is not running. On exit the daemons are stopped
(the namespaces' removal kills whatever is left); munged stays for other users.

Partitions: `debug` (default) and `high`, which preempts `debug` jobs by requeueing them
(PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=0). Each node advertises 2
fake GPUs (null devices) so the launcher's `--gpus-per-node` schedules. No accounting (slurmdbd):
tests follow jobs with `scontrol show job`, which keeps a finished job for MinJobAge=300 s.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import REPO

CTLD_PORT, SLURMD_PORT = 16817, 16818


def ensure_munge() -> None:
    """munged running (machine-wide; left running afterwards like slurm/local/start.sh does)."""
    def ok() -> bool:
        proc = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
        return proc.returncode == 0

    if ok():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        subprocess.run(["mungekey", "--create"], capture_output=True)
    subprocess.run(["chown", "munge:munge", str(key)], check=True)
    key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "munge:munge", d], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if ok():
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


def write_conf(hosts, root: Path) -> Path:
    for d in ("ctld", "spool", "run", "log", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for h in hosts:
        (root / "spool" / h.name).mkdir(exist_ok=True)
    for i in range(2):
        dev = root / "dev" / f"gpu{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # the null device under a GPU's name
    first = hosts[0]
    nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=4 RealMemory=2000 Gres=gpu:2 State=UNKNOWN"
                      for h in hosts)
    names = ",".join(h.name for h in hosts)
    conf = root / "slurm.conf"
    conf.write_text(f"""# megaret tests/multinode_slurm.py: SLURM across network-namespace hosts
ClusterName=mrhosts{os.getpid()}
SlurmctldHost={first.name}({first.addr})
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes={names} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF GraceTime=0
""")
    (root / "gres.conf").write_text("AutoDetect=off\n" + "".join(
        f"NodeName={h.name} Name=gpu File={root}/dev/gpu[0-1]\n" for h in hosts))
    return conf


class Cluster:
    def __init__(self, hosts, root: Path, conf: Path) -> None:
        self.hosts, self.root, self.conf = hosts, root, conf
        self.env = dict(os.environ, SLURM_CONF=str(conf))

    def run(self, *argv: str, check: bool = True, host: int = 0) -> str:
        """A SLURM client command on a host (the first: the login node)."""
        proc = self.hosts[host].run(list(argv), env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}\n{self.logs()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.root / "log").glob("*.log")))


@contextmanager
def slurm_cluster(hosts, root: Path) -> Iterator[Cluster]:
    """slurmctld on hosts[0], one slurmd per host; every node idle on entry; stopped on exit."""
    subprocess.run([str(REPO / "slurm/local/install.sh")], check=True, capture_output=True, timeout=900)
    ensure_munge()
    root.mkdir(parents=True, exist_ok=True)
    conf = write_conf(hosts, root)
    cluster = Cluster(hosts, root, conf)
    daemons = []
    try:
        t0 = time.time()
        daemons.append(hosts[0].popen(["slurmctld", "-D", "-f", str(conf)], env=cluster.env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for h in hosts:
            daemons.append(h.popen(["slurmd", "-D", "-f", str(conf), "-N", h.name], env=cluster.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while True:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).split("\n")
            up = {line.split()[0] for line in states if len(line.split()) == 2 and line.split()[1] == "idle"}
            if up == {h.name for h in hosts}:
                break
            if time.time() > deadline or any(d.poll() is not None for d in daemons):
                raise RuntimeError(f"SLURM did not come up (sinfo: {states}):\n{cluster.logs()}")
            time.sleep(0.3)
        cluster.startup_s = time.time() - t0
        yield cluster
    finally:
        for d in reversed(daemons):  # slurmds first, then slurmctld (SIGTERM: a clean shutdown)
            if d.poll() is None:
                d.terminate()
        for d in reversed(daemons):
            try:
                d.wait(timeout=15)
            except subprocess.TimeoutExpired:
                d.kill()
