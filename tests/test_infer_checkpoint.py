"""megaret.generate / megaret.evaluate --checkpoint (issue 7): a training checkpoint (step, checkpoints/
or run directory) consolidated in memory, the config from its manifest, gives the model that
`megaret.export`'s weights give: identical logits, tokens and losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megaret.checkpoint.consolidate import load_checkpoint
from megaret.config import load_config
from megaret.export import export
from megaret.infer.decoding import generate
from megaret.infer.loading import load_weights
from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config
from tests.conftest import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RetNet trained 3 steps on synthetic data, and its export."""
    run = tmp_path_factory.mktemp("infer_ckpt") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", "data.source=synthetic",
         "train.steps=3", "checkpoint.interval=3", "train.eval_interval=3", f"run.dir={run}"],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = export(run, run.parent / "model.pt")
    return run, out


def _model(cfg, ctx):
    return build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).to(ctx.device)


def test_checkpoint_model_equals_exported_model(trained, ctx1):
    run, out = trained
    for where in (run, run / "checkpoints", run / "checkpoints" / "step_0000003"):
        state, cfg, manifest = load_checkpoint(where)
        assert manifest["trainer"]["step"] == 3 and cfg.model.arch == "retnet"
        assert cfg.parallel.tensor == 1 and cfg.parallel.pipeline == 1
    assert cfg.model == load_config(run).model  # the manifest's config is the run's
    a = _model(cfg, ctx1)
    load_weights(a, state, "--checkpoint")
    b = _model(load_config(run), ctx1)
    load_weights(b, str(out))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)
    prompt = tokens[:1, :5]
    ga = generate(a, prompt, 12, greedy=True)
    assert torch.equal(ga, generate(b, prompt, 12, greedy=True))
    assert torch.equal(generate(a, prompt, 12, top_k=20, seed=3), generate(b, prompt, 12, top_k=20, seed=3))
    # overrides apply on top of the manifest's config
    _, cfg2, _ = load_checkpoint(run, ["model.retention_mode=parallel"])
    assert cfg2.model.retention_mode == "parallel" and cfg2.model.hidden_size == cfg.model.hidden_size


def test_generate_and_evaluate_cli_from_checkpoint(trained):
    """The CLIs with --checkpoint (no --config) print what --config RUN --weights EXPORT prints."""
    run, out = trained
    code = f"""
import json
from megaret import evaluate, generate
res = {{}}
for name, src in (("ckpt", ["--checkpoint", {str(run)!r}]), ("export", ["--config", {str(run)!r}, "--weights",
                                                                          {str(out)!r}])):
    ids = generate.main([*src, "--prompt", "def main(", "--max-new-tokens", "10", "--greedy"])
    summary = evaluate.main([*src, "--max-docs", "2", "--context", "128"])
    res[name] = {{"ids": ids, "loss": summary["loss"], "tokens": summary["tokens"]}}
print("RESULT", json.dumps(res))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert res["ckpt"] == res["export"]
    assert len(res["ckpt"]["ids"]) > 10 and res["ckpt"]["tokens"] > 0
    # DeepSpeed (imported to read the checkpoint) warns on stdout at import: kept off the console
    assert "Setting accelerator" not in proc.stdout + proc.stderr, proc.stdout[:2000]
    assert proc.stderr.count("evaluating valid: 2 documents, ") == 2, proc.stderr[-2000:]  # progress, no TTY


def test_checkpoint_errors_are_reported(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megaret.generate", "--checkpoint", str(tmp_path),
                           "--prompt", "x"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode != 0 and "no valid checkpoint" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "megaret.evaluate"], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode != 0 and "--checkpoint" in proc.stderr
