"""Preemption on a real SLURM: one submitit job (launcher/submit.py, tiny config, 2 tasks at TP=2)
is interrupted three times while it trains, and each time it is requeued and resumes by itself:

1. `scancel --signal=USR2` (SLURM's warning before a time limit or preemption): the ranks agree on a
   step, save a checkpoint there and submitit requeues the job;
2. `scontrol requeue`: SIGTERM, then SIGKILL after KillWait; it resumes from a checkpoint;
3. a job in the higher-priority `high` partition that needs the whole node preempts it
   (PreemptMode=REQUEUE); it runs again once that job is done.

Its final weights equal an uninterrupted run's (torchrun, same layout), bit for bit. The timings
(signal -> running again -> done) are printed. Root only: the `local_slurm` fixture installs SLURM.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaret.checkpoint.consolidate import consolidate
from megaret.checkpoint.files import list_checkpoints
from megaret.faults import plan_env
from tests.conftest import REPO

STEPS = 60
OVERRIDES = [
    "data.source=synthetic", "parallel.tensor=2", f"train.steps={STEPS}", "train.log_interval=1",
    "train.eval_steps=0", "logging.tensorboard=false", "checkpoint.interval=3", "checkpoint.keep_last=100",
    "parallel.backend=gloo",  # CPU ranks also on a GPU machine (two ranks cannot share one GPU under NCCL)
]
LAUNCH = ["launch.tasks_per_node=2", "launch.cpus_per_task=1", "launch.time_min=20"]
STEP_SLEEP_S = 0.5  # fault plan sleep_each_step_s: the job is still training at each interruption
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def latest_step(run_dir: Path) -> int:
    ckpts = list_checkpoints(run_dir / "checkpoints")
    return ckpts[-1][0] if ckpts else 0


def wait(cond, what: str, timeout: float, logs: Path) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return time.time()
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                      for p in sorted(logs.glob("*_log.*")))
    raise AssertionError(f"timed out waiting for: {what}\n{tails}")


@pytest.fixture(scope="module")
def preempted_job(local_slurm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("preempted")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "submit.py"), "--config", "configs/tiny.yaml", *OVERRIDES,
         *LAUNCH, f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(ENV, **plan_env(sleep_each_step_s=STEP_SLEEP_S)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\d+) \(slurm\)", proc.stdout).group(1)
    logs = run_dir / "submitit"
    events: list[dict] = []

    def running(restarts: int):
        return lambda: (lambda i: i.get("JobState") == "RUNNING" and int(i.get("Restarts", -1)) == restarts)(
            job_info(job_id))

    def progressed(beyond: int):
        return lambda: latest_step(run_dir) > beyond and job_info(job_id).get("JobState") == "RUNNING"

    interrupts = [
        ("usr2", ["scancel", "--signal=USR2", job_id]),
        ("scontrol requeue", ["scontrol", "requeue", job_id]),
        ("preempted by partition high",
         ["sbatch", "-p", "high", "--exclusive", "--parsable", "-o", "/dev/null", "--wrap", "sleep 5"]),
    ]
    seen = 0
    t_running = wait(running(0), "the job runs", 600, logs)
    for restarts, (name, cmd) in enumerate(interrupts, start=1):
        wait(progressed(seen), f"a checkpoint after step {seen} before '{name}'", 600, logs)
        at_signal = latest_step(run_dir)
        t_sig = time.time()
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        t_again = wait(running(restarts), f"running again after '{name}'", 600, logs)
        events.append({"name": name, "latest_at_signal": at_signal, "signal_to_running_s": t_again - t_sig,
                       "running_before_s": t_sig - t_running})
        t_running = t_again
        seen = latest_step(run_dir)
    t_done = wait(lambda: job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                  "the job ends", 900, logs)
    info = job_info(job_id)
    return {"run_dir": run_dir, "job_id": job_id, "events": events, "info": info, "t0": t0,
            "last_running_to_done_s": t_done - t_running, "total_s": t_done - t0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training, never interrupted (torchrun, 2 ranks, same layout)."""
    run_dir = tmp_path_factory.mktemp("reference")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "megaret.train", "--config", "configs/tiny.yaml", *OVERRIDES,
         f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    step, ckpt = list_checkpoints(run_dir / "checkpoints")[-1]
    state, _ = consolidate(ckpt)
    return step, {k: v for k, v in state.items() if torch.is_tensor(v)}


@pytest.mark.root_install
def test_preempted_job_is_requeued_three_times_and_completes(preempted_job):
    job = preempted_job
    info = job["info"]
    assert info["JobState"] == "COMPLETED", info
    assert int(info["Restarts"]) == 3, info
    ev = "; ".join(f"{e['name']}: running again {e['signal_to_running_s']:.1f}s after the signal "
                   f"(had run {e['running_before_s']:.1f}s, latest checkpoint step {e['latest_at_signal']})"
                   for e in job["events"])
    print(f"job {job['job_id']}: {ev}; last start -> done {job['last_running_to_done_s']:.1f}s; "
          f"submit -> done {job['total_s']:.1f}s")


@pytest.mark.root_install
def test_each_restart_resumed_from_a_checkpoint_and_usr2_saved_one(preempted_job):
    run_dir, job_id = preempted_job["run_dir"], preempted_job["job_id"]
    text = (run_dir / "submitit" / f"{job_id}_0_log.out").read_text(errors="replace") + \
        (run_dir / "submitit" / f"{job_id}_0_log.err").read_text(errors="replace")
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) \(step", text)]
    assert len(resumed) == 3 and resumed == sorted(resumed) and resumed[0] > 0, (resumed, text[-3000:])
    m = re.search(r"caught SIGUSR2: checkpoint of step (\d+) saved", text)
    assert m, text[-3000:]
    assert resumed[0] == int(m.group(1))  # the USR2 restart began exactly where it stopped


@pytest.mark.root_install
def test_final_weights_equal_an_uninterrupted_run(preempted_job, reference):
    step, w = weights(preempted_job["run_dir"])
    ref_step, ref_w = weights(reference)
    assert step == ref_step == STEPS
    assert w.keys() == ref_w.keys() and w
    assert all(torch.equal(w[k], ref_w[k]) for k in w), max((w[k] - ref_w[k]).abs().max().item() for k in w)
