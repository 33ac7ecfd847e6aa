"""The training engine's remaining pieces (issue 5): metrics and evaluation, loss_mask, carried
state over segments, activation recomputation, bf16, sequence parallelism, eval under PP/TP/DP.

Two launches of tests/distributed/train_features.py: one rank (metrics run + feature checks)
and two ranks (TP=2 with/without sequence parallelism and recompute, PP=2, DP=2).
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from megaret.config import ConfigError, load_config
from megaret.models.retnet import RetNet
from megaret.parallel.megatron_config import megatron_config
from megaret.train.batches import Batch, SyntheticBatches
from megaret.train.metrics import SCALARS, model_flops_per_token
from tests.conftest import run_distributed

TOL = 1e-5


def result(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------
# in process


def test_flops_per_token_counts_weights_and_mixer():
    cfg = load_config("configs/tiny.yaml").model  # d 64, f 128, L 2, H 4, v 2, V 512, chunk 16
    d, f, v, n = 64, 128, 2, 2
    weights = n * ((2 + 3 * v) * d * d + 2 * d * f) + 512 * d
    mixer = 2 * 16 * d * (1 + v) + 4 * v * d * d / 4
    assert model_flops_per_token(cfg, 64) == pytest.approx(3 * (2 * weights + n * mixer))
    cfg.retention_mode = "parallel"
    assert model_flops_per_token(cfg, 64) > model_flops_per_token(load_config("configs/tiny.yaml").model, 64)


def test_batch_splits_and_still_unpacks():
    b = SyntheticBatches(64, 8, 4, 1, 0, seed=1).next_batch(1)
    tokens, labels = b
    assert torch.equal(tokens, b.tokens) and torch.equal(b[1], labels)
    assert torch.equal(b.loss_mask, torch.ones(4, 8))
    b.reset = torch.tensor([True, False, False, True])
    parts = b.split(2)
    assert [p.tokens.shape for p in parts] == [(2, 8), (2, 8)]
    assert parts[1].reset.tolist() == [False, True] and parts[0].doc_start is None
    # the held-out split (negative steps) is the same task with other samples
    held = SyntheticBatches(64, 8, 4, 1, 0, seed=1).next_batch(-1)
    assert not torch.equal(held.tokens, b.tokens)
    src = SyntheticBatches(64, 8, 4, 1, 0, seed=1)
    assert torch.equal(src.next_of[held.tokens[:, :-1]], held.tokens[:, 1:])


def test_recompute_reproduces_gradients_with_dropout(ctx1):
    cfg = load_config("configs/tiny.yaml", ["model.dropout=0.1", "model.vocab_size=96"])
    config = megatron_config(cfg.model, cfg.parallel)
    torch.manual_seed(3)
    model = RetNet(cfg.model, config, ctx1.tp)
    x = torch.randint(96, (2, 64), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.recompute = recompute
        torch.manual_seed(11)  # the same dropout masks in both runs
        model(x, x).loss.mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0, msg=k)


def test_unsupported_combinations_are_refused():
    load_config("configs/tiny.yaml", [  # stateful segments under a pipeline
        "data.packing=segments", "parallel.pipeline=2"])
    with pytest.raises(ValueError, match="use parallel.zero_stage=1"):
        load_config("configs/tiny.yaml", [
            "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"])
    for arch_cfg in ("configs/tiny.yaml", "configs/brt-tiny.yaml", "configs/sliding-tiny.yaml",
                     "configs/transformer-tiny.yaml"):  # every arch: resets, SP and recompute
        load_config(arch_cfg, [
            "data.reset_at_doc_boundaries=true", "parallel.tensor=2", "parallel.sequence_parallel=true",
            "train.recompute=true"])
    # stateful segments: the windowed archs carry bounded caches; the causal cache grows without bound
    for arch_cfg in ("configs/brt-tiny.yaml", "configs/sliding-tiny.yaml"):
        load_config(arch_cfg, ["data.packing=segments"])
    with pytest.raises(ValueError, match="model.arch=transformer.*grows.*use data.packing=packed"):
        load_config("configs/transformer-tiny.yaml", ["data.packing=segments"])
    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        load_config("configs/tiny.yaml", ["logging.peak_tflops=0"])


# ------------------------------------------------------------------------------------------
# launched


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    proc = run_distributed("train_features.py", 1, "single", str(tmp))
    return types.SimpleNamespace(report=result(proc), run_dir=tmp / "metrics", stdout=proc.stdout)


def test_metrics_tensorboard_eval_and_profile(single):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = single.report["metrics"]
    acc = EventAccumulator(str(single.run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{s}" for s in SCALARS} | {"train/mfu", "eval/loss", "eval/ppl"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    tflops, mfu = acc.Scalars("train/tflops"), acc.Scalars("train/mfu")
    assert all(t.value > 0 for t in tflops)
    assert [m.value for m in mfu] == pytest.approx([t.value / 0.5 for t in tflops], rel=1e-5)  # world 1
    tok_s = acc.Scalars("train/tokens_per_s")[0].value
    cfg = load_config(single.run_dir)
    assert tflops[0].value == pytest.approx(tok_s * model_flops_per_token(cfg.model, 32) / 1e12, rel=1e-5)
    assert all(m.value > 10 for m in acc.Scalars("train/memory_mib"))  # max RSS, MiB
    ev = acc.Scalars("eval/loss")
    assert [e.step for e in ev] == [2, 4]
    assert [e.value for e in ev] == pytest.approx(r["evals"], rel=1e-6)
    assert ev[1].value < ev[0].value  # held-out loss falls while training
    assert acc.Scalars("eval/ppl")[1].value == pytest.approx(math.exp(ev[1].value), rel=1e-5)
    lines = [ln for ln in single.stdout.splitlines() if ln.startswith("step ")]
    assert any("ETA" in ln and "TFLOP/s" in ln and "MFU" in ln and "tok/s" in ln for ln in lines)
    assert list((single.run_dir / "tensorboard" / "profile").glob("*.pt.trace.json"))


def test_loss_mask_weights_tokens_exactly(single):
    r = single.report["loss_mask"]
    print(json.dumps(r, indent=1))
    assert r["tokens"] == 32 + 5 + 20 + 1
    assert r["first_loss"] == pytest.approx(r["direct_masked"], rel=1e-6)
    assert abs(r["direct_masked"] - r["unmasked_mean"]) > 1e-2  # the mask matters here
    split = r["split_1_vs_4"]  # 1 vs 4 micro-batches with uneven masks: same update
    assert split["loss_rel"] <= TOL and split["param_rel_norm"] <= TOL


def test_carried_state_over_segments_equals_one_pass(single):
    r = single.report["stateful"]
    print(json.dumps(r, indent=1))
    assert r["carried"] == pytest.approx(r["one_pass"], rel=1e-6, abs=0)
    assert max(abs(a - b) for a, b in zip(r["not_carried"], r["one_pass"], strict=True)) > 1e-4


@pytest.mark.parametrize("arch", ["brt", "sliding"])
def test_windowed_archs_carry_state_over_segments(single, arch):
    """BRT (state + previous-block cache) and sliding-window (previous-block cache): carried,
    detached state over consecutive segments == one pass over the whole documents; slot 0's
    reset at step 3 restores the initial state (ignoring the flag changes step 3 only)."""
    r = single.report[f"stateful_{arch}"]
    print(json.dumps(r, indent=1))
    assert max(abs(a - b) for a, b in zip(r["carried"], r["one_pass"], strict=True)) <= TOL
    assert max(abs(a - b) for a, b in zip(r["not_carried"], r["one_pass"], strict=True)) > 1e-4
    ignored = r["resets_ignored"]
    assert ignored[:2] == r["carried"][:2] and abs(ignored[2] - r["one_pass"][2]) > 1e-4


def test_recompute_changes_nothing(single):
    r = single.report["recompute"]
    assert r["loss_rel"] == 0.0 and r["param_rel_norm"] == 0.0


def test_bf16_trains(single):
    r = single.report["bf16"]
    assert r["param_dtypes"] == ["torch.bfloat16"]  # DeepSpeed keeps fp32 master weights itself
    assert all(math.isfinite(v) for v in r["losses"])
    assert sum(r["losses"][-3:]) / 3 < r["losses"][0] - 0.5


def test_sequence_parallel_pipeline_and_dp_eval_parity(tmp_path):
    report = result(run_distributed("train_features.py", 2, "layouts", str(tmp_path)))
    print(json.dumps(report, indent=1))
    assert len(report["tp2"]["evals"]) == 2
    for name in ("tp2-sp", "tp2-sp-recompute", "pp2", "dp2", "brt-tp2-sp-recompute",
                 "transformer-tp2-sp-recompute"):
        e = report[name]
        assert e["loss_rel"] <= TOL and e["param_rel_norm"] <= TOL and e["eval_rel"] <= TOL, name
        assert e["param_rel_max"] <= 1e-3, name
    # every norm parameter on the token path (2 per LayerNorm, 2 norms per block, 2 blocks, final
    # norm) is tagged; BRT's state-path norms see the whole state on every rank and are not
    for name in ("tp2-sp", "brt-tp2-sp-recompute", "transformer-tp2-sp-recompute"):
        assert report[name]["sp_tagged"] == 2 * (2 * 2 + 1), name
    assert report["pp2"]["sp_tagged"] == 0
    # stateful segments at PP=2 (each stage carries its own layers' state) == one pass
    for name in ("stateful_pp2", "stateful_brt_pp2"):
        r = report[name]
        assert max(abs(a - b) for a, b in zip(r["carried"], r["one_pass"], strict=True)) <= TOL, name
        assert max(abs(a - b) for a, b in zip(r["not_carried"], r["one_pass"], strict=True)) > 1e-4, name


def test_batch_to_and_of():
    b = Batch.of(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    assert b.to(torch.device("cpu")).loss_mask.sum() == 6
