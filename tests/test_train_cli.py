"""The README's main command: the tiny RetNet trains on the embedded corpus's shards."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

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
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 80 and saved["data"]["source"] == "shards"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_key_is_one_line_with_a_suggestion_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", "model.num_layer=3"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "did you mean model.num_layers" in proc.stderr
