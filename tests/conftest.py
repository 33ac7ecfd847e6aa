"""Shared fixtures and the skip policy.

Tests that need software only root can install (SLURM, MPI) install it when run as root
and otherwise skip with the reason; tests of flash-linear-attention's kernels (marker
`kernels`) skip without fla-core and triton (the `kernels` extra). With MEGARET_STRICT_SKIPS=1
(set by .ci/run) such a skip is a failure, so CI never passes by skipping. GPU tests skip
without CUDA, always.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STRICT_MARKERS = ("root_install", "kernels")  # tests CI must run, never skip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    strict = os.environ.get("MEGARET_STRICT_SKIPS") == "1"
    if not (strict and report.skipped):
        return
    for marker in STRICT_MARKERS:
        if item.get_closest_marker(marker) is not None:
            report.outcome = "failed"
            report.longrepr = f"MEGARET_STRICT_SKIPS=1 forbids skipping a {marker} test: {report.longrepr}"
            return


@pytest.fixture(scope="session")
def ctx1():
    """A one-process gloo world (CPU ranks, also on a GPU machine) with megatron's parallel state at
    TP=PP=1. GPU tests may move a model built on it to CUDA: at TP=1 no collective runs."""
    from megaret.parallel.context import build_parallel_context

    return build_parallel_context(1, 1, seed=1234, backend="gloo")


def run_distributed(
    script: str, nproc: int, *args: str, timeout: int = 600, gpu: bool = False
) -> subprocess.CompletedProcess:
    """Launch tests/distributed/<script> on `nproc` ranks (torchrun); fail with its output.

    The ranks run on the CPU (gloo, CPU tensors) with CUDA hidden, also on a GPU machine, unless
    `gpu`: then they see the GPUs and parallel.backend=auto picks nccl."""
    with socket.socket() as s:  # torchrun's --master_port 0 hangs on gloo: pick a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(REPO / "tests" / "distributed" / script), *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # torch sees no GPU: auto -> gloo, CPU devices, CPU adapters on
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{script} on {nproc} ranks failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# software only root can install: a real single-node SLURM, Open MPI (tests marked root_install)


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to install SLURM (apt-get): run as root")


@pytest.fixture(scope="session")
def local_slurm():
    """A real single-node SLURM (slurm/local/start.sh); stopped at the end if this session started it."""
    import shutil
    import time

    _needs_root()
    subprocess.run([str(REPO / "slurm/local/install.sh")], check=True, capture_output=True, timeout=900)
    already = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True).returncode == 0
    t0 = time.time()
    proc = subprocess.run([str(REPO / "slurm/local/start.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"slurm/local/start.sh failed:\n{proc.stdout}\n{proc.stderr}")
    print(f"local SLURM up in {time.time() - t0:.1f}s: {proc.stdout.strip()}")
    yield
    if not already:
        subprocess.run([str(REPO / "slurm/local/stop.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def local_mpi():
    """Open MPI (apt) and mpi4py (pip) installed; returns the mpirun path."""
    import shutil

    _needs_root()
    subprocess.run([str(REPO / "slurm/local/install.sh")], check=True, capture_output=True, timeout=900)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "mpi4py>=3.1"], check=True, timeout=600)
    mpirun = shutil.which("mpirun")
    assert mpirun is not None, "slurm/local/install.sh did not provide mpirun"
    return mpirun


def tensorboard_scalars(run_dir: str | Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of one scalar from run_dir/tensorboard, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return sorted((e.step, e.value) for e in acc.Scalars(tag)) if tag in acc.Tags()["scalars"] else []
