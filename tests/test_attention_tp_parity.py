"""Transformer, sliding-window and BRT logits and every parameter gradient at TP=2 and TP=4
equal TP=1 (one launch of 4 gloo ranks covers all of them)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_distributed

VARIANTS = ("transformer", "sliding", "brt-fixed-skip", "brt-lstm-mlp")


@pytest.mark.multiproc
def test_attention_models_tp2_tp4_match_tp1():
    proc = run_distributed("attention_tp_parity.py", 4)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    print(json.dumps(results, indent=1))
    assert set(results) == {f"{v}/tp{t}" for v in VARIANTS for t in (2, 4)}
    for key, r in results.items():
        assert r["logits_rel"] <= 1e-5, (key, r)
        assert r["grad_rel_max"] <= 1e-5, (key, r)
