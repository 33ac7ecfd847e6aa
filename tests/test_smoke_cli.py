"""The README's main command (until the trainer lands): the tiny RetNet trains and prints loss."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from tests.conftest import REPO


def test_smoke_run_prints_falling_loss_and_writes_the_resolved_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.smoke", "--config", "configs/tiny.yaml",
         f"run.dir={run_dir}", "train.steps=40", "train.log_interval=10", "model.vocab_size=64"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) >= 4, proc.stdout
    assert losses[-1] < 0.7 * losses[0], proc.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 40 and saved["model"]["vocab_size"] == 64


def test_smoke_run_rejects_a_bad_key_with_a_suggestion(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.smoke", "--config", "configs/tiny.yaml", "model.num_layer=3"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode != 0
    assert "did you mean model.num_layers" in proc.stderr
