"""Transformer, sliding-window and BRT logits and every parameter gradient at TP=2 and TP=4
equal TP=1; every registered arch builds from its spec at TP=2 and round-trips its carried
state through the state protocol (one launch of 4 gloo ranks covers all of them)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_distributed

VARIANTS = ("transformer", "sliding", "brt-fixed-skip", "brt-lstm-mlp")


@pytest.fixture(scope="module")
def launched() -> dict:
    proc = run_distributed("attention_tp_parity.py", 4)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.multiproc
def test_attention_models_tp2_tp4_match_tp1(launched):
    results = launched["parity"]
    print(json.dumps(results, indent=1))
    assert set(results) == {f"{v}/tp{t}" for v in VARIANTS for t in (2, 4)}
    for key, r in results.items():
        assert r["logits_rel"] <= 1e-5, (key, r)
        assert r["grad_rel_max"] <= 1e-5, (key, r)


@pytest.mark.multiproc
def test_every_arch_spec_builds_at_tp2_and_round_trips_its_state(launched):
    from megaret.models.spec import SPECS

    specs = launched["specs"]
    print(json.dumps(specs, indent=1))
    assert set(specs) == set(SPECS)
    for arch, r in specs.items():
        assert r["state_type_ok"] and r["state_batch"] == 2 and r["state_bytes"] > 0, (arch, r)
        assert r["resumed_equal"], (arch, r)  # save, load, continue == uninterrupted, bit for bit
        assert r["reset_rel"] <= 1e-5, (arch, r)  # reset every sample == a fresh start
        assert r["grads_finite"] and r["grads_nonzero"] == 1.0, (arch, r)
        assert r["logits_rel_tp1"] <= 1e-5, (arch, r)
