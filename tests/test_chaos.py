"""Chaos and hangs on CPU (torchrun, 2 ranks, no SLURM).

- kill -9 of every training process (the torchrun agent and both ranks) at 3 seeded random moments,
  then a fault injected between writing a checkpoint's files and its rename (the fault plan's
  exit_before_publish, megaret/faults.py), restarting after each: the final weights equal an
  uninterrupted run's, bit for bit.
- a rank that stalls before a step (the fault plan's stall) makes the job exit non-zero once
  train.collective_timeout_s has passed, instead of hanging.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megaret.checkpoint.consolidate import consolidate
from megaret.checkpoint.files import list_checkpoints
from megaret.faults import FAULT_EXIT, plan_env
from tests.conftest import REPO

pytestmark = pytest.mark.multiproc

STEPS = 40
COMMON = [
    "data.source=synthetic", f"train.steps={STEPS}", "train.log_interval=1", "train.eval_steps=0",
    "logging.tensorboard=false", "checkpoint.interval=3", "checkpoint.keep_last=2",
    "parallel.backend=gloo",  # CPU ranks also on a GPU machine (two ranks cannot share one GPU under NCCL)
]
STEP_SLEEP_S = 0.25  # fault plan sleep_each_step_s: a full run takes > 10 s, so kills land mid-run
SEED = 20261122


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, log: Path, *extra: str, faults: dict | None = None) -> subprocess.Popen:
    """torchrun, 2 CPU ranks, `python -m megaret.train` on the tiny config; output appended to `log`.
    `faults`: the fault plan (megaret/faults.py), on top of sleeping STEP_SLEEP_S before each step."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), "-m", "megaret.train", "--config", "configs/tiny.yaml", *COMMON,
        *extra, f"run.dir={run_dir}",
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                **plan_env(**{"sleep_each_step_s": STEP_SLEEP_S, **(faults or {})})}
    with open(log, "a") as out:
        out.write(f"\n===== launch {' '.join(cmd[-3:])} =====\n")
        out.flush()
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                start_new_session=True)


def kill9_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the agent and every worker (workers run in their own sessions); how many were alive."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    return len(procs)


def wait_for(pattern: str, log: Path, proc: subprocess.Popen, start: int, timeout: float = 600) -> bool:
    """True once `pattern` appears in `log` after byte `start`; False if the launch ended first."""
    rx = re.compile(pattern, re.M)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rx.search(log.read_text(errors="replace")[start:]):
            return True
        if proc.poll() is not None:
            return bool(rx.search(log.read_text(errors="replace")[start:]))
        time.sleep(0.2)
    kill9_tree(proc)
    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{log.read_text()[-4000:]}")


def final_weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    step, ckpt = list_checkpoints(run_dir / "checkpoints")[-1]
    state, manifest = consolidate(ckpt)
    assert manifest["trainer"]["step"] == step
    return step, {k: v for k, v in state.items() if torch.is_tensor(v)}


def test_kill9_and_fault_injection_resume_to_the_uninterrupted_weights(tmp_path):
    t_start = time.time()
    ref_log = tmp_path / "ref.log"
    ref = launch(tmp_path / "ref", ref_log)
    assert ref.wait(timeout=900) == 0, ref_log.read_text()[-4000:]

    run, log = tmp_path / "chaos", tmp_path / "chaos.log"
    rng = random.Random(SEED)
    kills = []
    for _ in range(3):
        start = log.stat().st_size if log.exists() else 0
        proc = launch(run, log)
        assert wait_for(r"^step\s+\d+/", log, proc, start), log.read_text()[-4000:]
        delay = rng.uniform(0.0, 3.0)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
        latest_file = run / "checkpoints" / "latest"
        latest = latest_file.read_text().strip() if latest_file.exists() else None
        assert kill9_tree(proc) >= 3  # torchrun + 2 ranks
        kills.append((round(delay, 2), latest))
    steps_done = [int(m) for m in re.findall(r"^step\s+(\d+)/", log.read_text(), re.M)]
    assert max(steps_done) < STEPS, "the chaos run finished before its last kill"

    # a fault between the files and the rename: nothing half-written is ever published
    start = log.stat().st_size
    proc = launch(run, log, faults={"exit_before_publish": True})
    rc = proc.wait(timeout=900)
    assert rc != 0, log.read_text()[-3000:]
    assert re.search(rf"exitcode\s*:\s*{FAULT_EXIT}\b", log.read_text()[start:]), log.read_text()[-3000:]
    unpublished = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-step_")]
    assert len(unpublished) == 1 and (unpublished[0] / "manifest.json").is_file(), unpublished
    unpublished_step = int(re.match(r"\.tmp-step_(\d+)", unpublished[0].name).group(1))
    assert all(s < unpublished_step for s, _ in list_checkpoints(run / "checkpoints"))

    start = log.stat().st_size
    proc = launch(run, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    last = log.read_text()[start:]
    assert "removed the unfinished save" in last and "resumed from" in last, last[-3000:]

    ref_step, ref_w = final_weights(tmp_path / "ref")
    step, w = final_weights(run)
    assert step == ref_step == STEPS
    assert ref_w.keys() == w.keys() and len(w) > 0
    diff = max((w[k] - ref_w[k]).abs().max().item() for k in w)
    assert all(torch.equal(w[k], ref_w[k]) for k in w), f"max |diff| {diff}"
    resumed = re.findall(r"resumed from \S+step_(\d+) \(step", log.read_text())
    print(f"chaos: kills (delay s after the first step, latest checkpoint then) {kills}; "
          f"injected fault before publishing step {unpublished_step}; resumed from steps {resumed}; "
          f"final weights bit-identical ({len(w)} tensors); {time.time() - t_start:.0f}s")


def test_a_stalled_rank_makes_the_job_fail_within_the_collective_timeout(tmp_path):
    timeout_s = 20
    log = tmp_path / "hang.log"
    proc = launch(tmp_path / "run", log, "train.steps=6", f"train.collective_timeout_s={timeout_s}",
                  faults={"stall": {"rank": 1, "step": 3, "seconds": 900}, "sleep_each_step_s": 0})
    assert wait_for(r"stalling 900", log, proc, 0), log.read_text()[-4000:]
    t_stall = time.time()
    try:
        rc = proc.wait(timeout=timeout_s + 240)
    except subprocess.TimeoutExpired:
        kill9_tree(proc)
        tail = log.read_text()[-4000:]
        raise AssertionError(f"still running {timeout_s + 240}s after the stall:\n{tail}") from None
    waited = time.time() - t_stall
    text = log.read_text()
    assert rc != 0, text[-4000:]
    assert re.search(r"timed out|timeout", text, re.I), text[-4000:]
    assert timeout_s - 2 <= waited <= timeout_s + 120, (waited, text[-3000:])
    print(f"hang: a rank stalled before step 3; the job exited with {rc} {waited:.1f}s later "
          f"(train.collective_timeout_s={timeout_s})")


def test_shards_are_verified_once_and_a_corrupt_one_stops_every_rank(tmp_path):
    """Two ranks on real shards: the first rank of the machine verifies and stamps every shard;
    after a shard is damaged, the next launch stops on both ranks (the verifying one naming the
    shard and the fix, the other pointing at it) instead of one rank waiting for the other."""
    from tests.data_fixtures import build_tiny

    manifest = build_tiny(tmp_path / "data")
    data = ["data.source=shards", f"data.paths=[{manifest}]", "data.seq_length=16", "model.vocab_size=384",
            f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "checkpoint.interval=100"]
    log = tmp_path / "run.log"
    ok = launch(tmp_path / "ok", log, *data)
    assert ok.wait(timeout=600) == 0, log.read_text()[-4000:]
    shards = sorted(manifest.parent.glob("train-*.tar"))  # eval is off: the valid split is not opened
    assert len(list((tmp_path / "cache" / "verified").glob("*.json"))) == len(shards)

    shard = manifest.parent / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[2000:2004] = b"\xff\xfe\xfd\xfc"  # same size: only the hash can tell
    shard.write_bytes(bytes(raw))
    start = log.stat().st_size
    bad = launch(tmp_path / "bad", log, *data)
    assert bad.wait(timeout=600) != 0
    out = log.read_text()[start:]
    assert "train-000001.tar is corrupt" in out and "data.on_corrupt=skip" in out, out[-4000:]
    assert "failed on another rank" in out, out[-4000:]
