"""RetNet logits and every parameter gradient at TP=2 and TP=4 equal TP=1 (2 and 4 gloo ranks)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_distributed


@pytest.mark.multiproc
@pytest.mark.parametrize(("nproc", "tp_sizes"), [(2, (2,)), (4, (2, 4))])
def test_retnet_tp_matches_tp1(nproc, tp_sizes):
    proc = run_distributed("tp_parity.py", nproc, *map(str, tp_sizes))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    print(json.dumps(results, indent=1))
    assert set(results) == {f"{m}/tp{t}" for m in ("chunk/gelu", "parallel/swiglu") for t in tp_sizes}
    for key, r in results.items():
        assert r["logits_rel"] <= 1e-5, (key, r)
        assert r["grad_rel_max"] <= 1e-5, (key, r)
        assert r["grad_norm_rel"] <= 1e-5, (key, r)
