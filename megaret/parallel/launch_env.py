"""Who am I in the job? Rank discovery for torchrun, srun and mpirun launches.

torch.distributed's env:// init reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. torchrun
sets them; srun and mpirun set their own variables instead. `discover_launch_env` reads
whichever launcher started this process and exports the torch variables (plus LOCAL_RANK and
LOCAL_WORLD_SIZE), so `python -m megaret.train ...` runs unchanged under all three:

    torchrun --nproc_per_node 8 -m megaret.train --config ...      RANK / WORLD_SIZE / LOCAL_RANK
    srun python -m megaret.train --config ...                       SLURM_PROCID / SLURM_STEP_NUM_TASKS
    mpirun -np 8 python -m megaret.train --config ...               OMPI_COMM_WORLD_* (or PMI_*) + mpi4py

Precedence: torchrun's variables, then MPI (an mpirun inside an sbatch script also carries
SLURM variables), then an srun step. A bare `python` (also the batch script itself, which
has SLURM_NTASKS but no SLURM_STEP_NUM_TASKS) is a world of one and the environment is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher described it."""

    source: str  # "torchrun" | "mpi" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }  # fmt: skip


#: Variables a CUDA rank needs before its CUDA context exists, set unless the launcher chose otherwise.
#: CUDA_DEVICE_MAX_CONNECTIONS=1 keeps one hardware work queue, so the kernels megatron launches for
#: tensor/sequence-parallel communication run in the order it issues them (its overlap relies on it).
CUDA_LAUNCH_ENV: dict[str, str] = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def set_cuda_launch_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Set `CUDA_LAUNCH_ENV` in `environ` (default os.environ) where it is not set yet."""
    env = os.environ if environ is None else environ
    for key, value in CUDA_LAUNCH_ENV.items():
        env.setdefault(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: `scontrol show hostnames`, else parsed ("gpu[03-05,7],x" -> gpu03)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    assert head is not None  # the pattern matches any string
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_master_port(job_id: str) -> int:
    """A port every task of one SLURM job derives alike (same rule as submitit: 20000..60000)."""
    import random

    return random.Random(job_id).randint(20000, 60000)


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    """Rank 0's address and a free port on it, broadcast to every rank with mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "launched by mpirun but mpi4py is missing: pip install 'megaret[mpi]' (or set MASTER_ADDR and "
            "MASTER_PORT yourself)"
        ) from exc
    payload = (socket.gethostname(), _free_port()) if rank == 0 else None
    host, port = MPI.COMM_WORLD.bcast(payload, root=0)
    return host, port


def discover_launch_env(
    environ: MutableMapping[str, str] | None = None,
    export: bool = True,
    mpi_rendezvous: Callable[[int], tuple[str, int]] = _mpi_rendezvous,
) -> LaunchEnv:
    """Read the launcher's variables from `environ` (default os.environ) and export torch's into it.

    `export=False` only reads. MASTER_ADDR / MASTER_PORT already set win over derived ones.
    """
    env = os.environ if environ is None else environ
    get = env.get
    addr, port = get("MASTER_ADDR"), get("MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        found = LaunchEnv(
            "torchrun",
            int(env["RANK"]),
            world,
            int(get("LOCAL_RANK", "0")),
            int(get("LOCAL_WORLD_SIZE", str(world))),
            addr or "127.0.0.1",
            int(port or 29500),
        )
        export = False  # already torch's own variables
    elif "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        ompi = "OMPI_COMM_WORLD_SIZE" in env
        rank = int(env["OMPI_COMM_WORLD_RANK"] if ompi else env["PMI_RANK"])
        world = int(env["OMPI_COMM_WORLD_SIZE"] if ompi else env["PMI_SIZE"])
        local_rank = int(get("OMPI_COMM_WORLD_LOCAL_RANK", get("MPI_LOCALRANKID", "0")))
        local_world = int(get("OMPI_COMM_WORLD_LOCAL_SIZE", get("MPI_LOCALNRANKS", str(world))))
        if addr is None or port is None:
            # collective: every rank takes part, even if it then keeps an address it already had
            shared_addr, shared_port = mpi_rendezvous(rank)
            addr, port = addr or shared_addr, port or str(shared_port)
        found = LaunchEnv("mpi", rank, world, local_rank, local_world, addr, int(port))
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        nodes = int(get("SLURM_STEP_NUM_NODES", get("SLURM_NNODES", "1")))
        nodelist = get("SLURM_STEP_NODELIST", get("SLURM_JOB_NODELIST", "127.0.0.1"))
        found = LaunchEnv(
            "slurm",
            int(env["SLURM_PROCID"]),
            world,
            int(get("SLURM_LOCALID", "0")),
            world // max(nodes, 1),
            addr or first_host(nodelist),
            int(port or slurm_master_port(get("SLURM_JOB_ID", "0"))),
        )
    else:
        found = LaunchEnv("single", 0, 1, 0, 1, addr or "127.0.0.1", int(port or 0))
        export = False  # a lone process: leave the environment to its children as it was
    if export:
        env.update(found.torch_env())
    return found
