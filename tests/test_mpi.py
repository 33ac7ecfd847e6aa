"""Rank discovery (megaret/parallel/launch_env.py) under torchrun, srun and mpirun.

The mpirun tests use a real Open MPI (apt) and mpi4py; the srun test a real single-node SLURM.
`mpirun -np 2 python -m megaret.train` at TP=2 must train exactly like torchrun at TP=2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megaret.parallel.launch_env import discover_launch_env, first_host
from tests.conftest import REPO, tensorboard_scalars

# each rank writes what it discovered (and what it exported) to OUT/<rank>.json
PROBE = (
    "import json, os, sys; from megaret.parallel.launch_env import discover_launch_env as d; e = d(); "
    "open(f'{sys.argv[1]}/{e.rank}.json', 'w').write("
    "json.dumps({**e.__dict__, 'env': {k: os.environ[k] for k in e.torch_env()}}))"
)
TRAIN = ["--config", "configs/tiny.yaml", "parallel.tensor=2", "parallel.backend=gloo", "train.steps=4",
         "train.log_interval=1"]  # gloo: CPU ranks also on a GPU machine


def probes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def env(**extra: str) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMI_", "SLURM_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**keep, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def launch(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a launcher command from the repository root; fail with the tail of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def mpirun(local_mpi: str, *cmd: str) -> list[str]:
    """`mpirun -np 2` as root in a container (oversubscribed, unbound)."""
    return [local_mpi, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", *cmd]


# ---------------------------------------------------------------------------------------------
# reading launcher variables


def test_torchrun_variables_are_taken_as_they_are():
    environ = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "1",
    }
    before = dict(environ)
    e = discover_launch_env(environ)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (
        "torchrun",
        3,
        8,
        1,
        "n1",
        1234,
    )
    assert environ == before


def test_srun_step_variables_are_exported():
    environ = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "8",
    }
    e = discover_launch_env(environ)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert e.master_addr == "gpu07" and 20000 <= e.master_port <= 60000
    assert environ["RANK"] == "5" and environ["WORLD_SIZE"] == "8" and environ["LOCAL_RANK"] == "1"
    assert environ["MASTER_ADDR"] == "gpu07" and environ["MASTER_PORT"] == str(e.master_port)
    # every task of the job derives the same port
    other = discover_launch_env({**environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, export=False)
    assert other.master_port == e.master_port


def test_a_batch_script_or_bare_python_is_a_world_of_one():
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "42"}  # sbatch script, no srun
    e = discover_launch_env(environ)
    assert (e.source, e.world_size) == ("single", 1) and "RANK" not in environ


@pytest.mark.parametrize("nodelist,first", [("gpu[03-05,7],x", "gpu03"), ("a1,a2", "a1"), ("node7", "node7")])
def test_first_host_of_a_nodelist(nodelist, first):
    assert first_host(nodelist) == first


# ---------------------------------------------------------------------------------------------
# real launchers


@pytest.mark.root_install
def test_srun_tasks_discover_one_world(local_slurm, tmp_path):
    proc = launch(["srun", "--ntasks=2", "--cpus-per-task=1", "--time=5", sys.executable, "-c", PROBE,
                   str(tmp_path)])
    got = probes(tmp_path)
    assert len(got) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(p["source"], p["rank"], p["world_size"], p["local_rank"]) for p in got] == [
        ("slurm", 0, 2, 0),
        ("slurm", 1, 2, 1),
    ]
    assert got[0]["master_addr"] == got[1]["master_addr"] == "localhost"
    assert got[0]["master_port"] == got[1]["master_port"]
    assert got[1]["env"]["RANK"] == "1" and got[1]["env"]["WORLD_SIZE"] == "2"


@pytest.mark.root_install
def test_mpirun_ranks_share_rank0s_port(local_mpi, tmp_path):
    proc = launch(mpirun(local_mpi, sys.executable, "-c", PROBE, str(tmp_path)))
    got = probes(tmp_path)
    assert len(got) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(p["source"], p["rank"], p["world_size"], p["local_rank"]) for p in got] == [
        ("mpi", 0, 2, 0),
        ("mpi", 1, 2, 1),
    ]
    assert got[0]["master_addr"] == got[1]["master_addr"] == socket.gethostname()
    assert got[0]["master_port"] == got[1]["master_port"] > 0
    assert got[1]["env"]["RANK"] == "1" and got[1]["env"]["MASTER_PORT"] == str(got[0]["master_port"])


@pytest.mark.root_install
@pytest.mark.multiproc
def test_mpirun_trains_like_torchrun(local_mpi, tmp_path):
    """TP=2 only builds if both processes join one world; the losses must equal torchrun's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ref_dir, mpi_dir = tmp_path / "torchrun", tmp_path / "mpirun"
    train = [sys.executable, "-m", "megaret.train", *TRAIN]
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
            "127.0.0.1", "--master_port", str(port), *train[1:], f"run.dir={ref_dir}"], timeout=600)
    launch(mpirun(local_mpi, *train, f"run.dir={mpi_dir}"), timeout=600)
    reference, losses = tensorboard_scalars(ref_dir), tensorboard_scalars(mpi_dir)
    assert [s for s, _ in reference] == [1, 2, 3, 4]
    assert losses == reference
