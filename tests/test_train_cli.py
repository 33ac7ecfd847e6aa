"""The README's main command: the tiny RetNet trains on the embedded corpus's shards; and what
the trainer says when it is misused (one `megaret: error:` line per rank, the table's exit code)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megaret.errors import ERROR_PREFIX, EXIT_USER
from tests.conftest import REPO


def test_train_on_default_corpus_shards_loss_falls_and_run_dir_is_complete(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", f"run.dir={run_dir}",
         "train.steps=80", "train.log_interval=10", "optimizer.warmup_steps=5"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) >= 8, proc.stdout
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, proc.stdout  # from ~log(512)=6.2, clearly down
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 80 and resolved["data"]["source"] == "shards"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # the banner names the data with its token counts, each checkpoint gets a line, the end a summary
    out = proc.stdout
    manifest = re.search(r"^data: (\S+manifest\.json): train ([\d,]+) tokens in [\d,]+ documents, valid "
                         r"([\d,]+) tokens; train.steps reads 20,480 tokens = [\d.]+ epochs$", out, re.M)
    assert manifest, out[:3000]
    splits = json.loads(Path(manifest[1]).read_text())["splits"]
    assert int(manifest[2].replace(",", "")) == splits["train"]["tokens"] > 0
    assert int(manifest[3].replace(",", "")) == splits["valid"]["tokens"] > 0
    assert f"run.dir: {run_dir} (" in out and "start: fresh, step 0 of 80" in out
    saved = re.findall(r"^checkpoint saved: step (\d+) -> ", out, re.M)
    assert saved == [str(s) for s in range(10, 81, 10)], out[-3000:]
    assert re.search(r"^done: steps 1-80 of 80 in .*\| eval loss \d\.\d{4}$", out, re.M), out[-3000:]
    assert f"python -m megaret.generate --checkpoint {run_dir} " in out.split("next:")[-1]
    # other libraries' chatter is in the run's log, not on the console
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr, proc.stdout[:2000]
    assert "Setting accelerator to CPU" in (run_dir / "logs" / "third_party-rank0.log").read_text()


@pytest.mark.parametrize("debug", ["", "1"])
def test_bad_key_is_one_line_with_a_suggestion_and_exit_2(tmp_path, debug):
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", "model.num_layer=3"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, MEGARET_DEBUG=debug),
    )
    assert proc.returncode == EXIT_USER
    lines = [line for line in proc.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and "did you mean model.num_layers" in lines[0], proc.stderr
    assert ("Traceback" in proc.stderr) == bool(debug), proc.stderr  # MEGARET_DEBUG=1 shows it


def launch_ranks(n: int, *overrides: str, timeout: float = 300) -> list[tuple[int, str]]:
    """`python -m megaret.train` as `n` ranks of one world (torch's variables set by hand, no
    torchrun, so each rank's status and stderr are its own): [(status, stderr)] by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(n):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        env.pop("MEGARET_DEBUG", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", "data.source=synthetic",
             "train.steps=2", "train.eval_steps=0", "logging.tensorboard=false", *overrides],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out.append((p.communicate(timeout=max(deadline - time.time(), 1))[1], p.returncode)[::-1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank still runs after {timeout}s: it waits for one that left") from None
    return out


def one_error_line_each(ranks: list[tuple[int, str]]) -> list[str]:
    lines = []
    for rank, (status, err) in enumerate(ranks):
        mine = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
        assert status == EXIT_USER and len(mine) == 1 and "Traceback" not in err, (rank, status, err[-3000:])
        lines += mine
    return lines


def test_a_world_the_layout_does_not_divide_is_refused_by_every_rank_at_once(tmp_path):
    t0 = time.time()
    ranks = launch_ranks(2, "parallel.tensor=4", f"run.dir={tmp_path / 'run'}", timeout=120)
    lines = one_error_line_each(ranks)
    assert all("world size 2 is not divisible by parallel.tensor*parallel.pipeline=4*1=4" in line
               and "launch a multiple of 4 processes" in line for line in lines), lines
    assert not (tmp_path / "run").exists()
    print(f"world 2 at TP=4: both ranks refused it in {time.time() - t0:.1f}s")


def test_a_run_dir_rank_0_cannot_write_stops_every_rank_in_one_line(tmp_path):
    """rank 0 writes run.dir alone; the other rank must not wait for it in the next collective.
    (Permissions do not stop root: run.dir lies under a regular file.)"""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    t0 = time.time()
    first, second = one_error_line_each(launch_ranks(2, "parallel.tensor=2", f"run.dir={blocker / 'run'}"))
    assert f"run.dir={blocker / 'run'} is not writable (Not a directory" in first, first
    assert "set run.dir to a directory this job can write" in first
    assert second == f"{ERROR_PREFIX} rank 0 failed: {first[len(ERROR_PREFIX) + 1:]}", (first, second)
    print(f"run.dir not writable: both ranks stopped in {time.time() - t0:.1f}s")
