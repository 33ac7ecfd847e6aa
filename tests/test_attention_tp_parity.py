"""Transformer, sliding-window and BRT logits and every parameter gradient at TP=2 and TP=4
equal TP=1; every registered arch builds from its spec at TP=2 and round-trips its carried
state through the state protocol; the dropout masks follow the seeding rule across TP, DP, sequence
parallelism and a resume of the RNG part (one launch of 4 gloo ranks covers all of them)."""

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
        assert r["dropout_ok"], (arch, r)  # every dropout follows the rule (megaret/models/dropout.py)
        assert r["grads_finite"] and r["grads_nonzero"] == 1.0, (arch, r)
        assert r["logits_rel_tp1"] <= 1e-5, (arch, r)


@pytest.mark.multiproc
def test_dropout_masks_follow_the_seeding_rule(launched):
    """TP=2 x DP=2, dropout 0.5 (the rule: megaret/models/dropout.py)."""
    r = launched["dropout"]
    print(json.dumps(r, indent=1))
    rep, sp = r["replicated"], r["sequence_parallel"]
    assert rep["tp_peers_equal"] == [True, True]  # replicated activations: TP replicas stay in step
    assert sp["tp_peers_equal"] == [False, False]  # sequence shards: each TP rank its own stream
    for layout in (rep, sp):
        assert layout["dp_ranks_equal"] == [False, False]  # each DP rank its own masks, same data
        assert not layout["next_step_equal"]  # the streams advance
        assert layout["resumed_equal"]  # the RNG part restored: the masks the run would have drawn
        assert 0.4 < layout["kept"] < 0.6
