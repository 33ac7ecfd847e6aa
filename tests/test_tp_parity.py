"""RetNet logits and every parameter gradient at TP=2 and TP=4 equal TP=1 (4 gloo ranks)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_distributed


@pytest.mark.multiproc
def test_retnet_tp2_tp4_match_tp1():
    proc = run_distributed("tp_parity.py", 4)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    print(json.dumps(results, indent=1))
    assert set(results) == {f"{m}/tp{t}" for m in ("chunk/gelu", "parallel/swiglu") for t in (2, 4)}
    for key, r in results.items():
        assert r["logits_rel"] <= 1e-5, (key, r)
        assert r["grad_rel_max"] <= 1e-5, (key, r)
        assert r["grad_norm_rel"] <= 1e-5, (key, r)
