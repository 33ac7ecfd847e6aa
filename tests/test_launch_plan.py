"""Launch planning (megaret/launch/plan.py): layout, parameters per rank, memory per GPU."""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.launch.plan import (
    GIB,
    PlanError,
    activation_memory,
    format_plan,
    make_layout,
    make_plan,
    stage_params,
    state_memory,
)
from megaret.models.layout import rank_layers as stage_layer_indices
from megaret.models.spec import param_count


def test_6_7b_layout_and_batch():
    lo = make_layout(load_config("configs/6.7b.yaml"))
    assert (lo.world, lo.tp, lo.pp, lo.dp) == (32, 4, 2, 4)
    assert lo.micro_batches == 2048 // (1 * 4) == 512
    assert lo.global_batch_tokens == 2048 * 2048


def test_6_7b_params_per_rank_by_hand():
    """Per layer: 8 d^2 (q, k at d x d; v, g, o at d x 2d) + 2 d f split over TP, 2 layernorms (4 d) not."""
    m = load_config("configs/6.7b.yaml").model
    d, f, v = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    layer = (8 * d * d + 2 * d * f) // 4 + 4 * d
    assert stage_params(m, tp=4, pp=2) == [16 * layer + v * d // 4, 16 * layer + v * d // 4 + 2 * d]


@pytest.mark.parametrize("name", ["tiny", "6.7b", "brt-tiny", "transformer-tiny"])
def test_stages_add_up_to_the_model_at_tp1(name):
    m = load_config(f"configs/{name}.yaml").model
    splits = [(pp, vp) for pp in (1, 2, 4) for vp in (1, 2) if m.num_layers % (pp * vp) == 0]
    assert splits
    for pp, vp in splits:
        assert sum(stage_params(m, 1, pp, vp)) == param_count(m), (pp, vp)
        held = sorted(i for s in range(pp) for i in stage_layer_indices(m.num_layers, pp, s, vp))
        assert held == list(range(m.num_layers)), (pp, vp)


@pytest.mark.parametrize("vp", [1, 2])
def test_stage_params_equal_meta_built_stages(ctx1, vp):
    """Each pipeline stage of the 6.7B, built on the meta device, holds what the plan says."""
    from megaret.models.retnet import RetNet
    from megaret.parallel.megatron_config import megatron_config

    cfg = load_config("configs/6.7b.yaml", ["parallel.tensor=1", f"parallel.virtual_pipeline={vp}"])
    m, pp = cfg.model, cfg.parallel.pipeline
    config = megatron_config(m, cfg.parallel)
    for stage, expected in enumerate(stage_params(m, 1, pp, vp)):
        built = 0
        for k in range(vp):  # the chunks of this stage
            per_chunk = m.num_layers // (pp * vp)
            first = (k * pp + stage) * per_chunk
            with torch.device("meta"):
                chunk = RetNet(
                    m,
                    config,
                    ctx1.tp,
                    pre_process=first == 0,
                    post_process=first + per_chunk == m.num_layers,
                    layers=range(first, first + per_chunk),
                )
            built += sum(p.numel() for p in chunk.parameters())
        assert built == expected, (stage, built, expected)


def test_zero_stages_shard_optimizer_then_grads_then_weights():
    n, dp = 1000, 4
    assert state_memory(n, 0, dp, "bf16") == (2000, 2000, 12000)
    assert state_memory(n, 1, dp, "bf16") == (2000, 2000, 3000)
    assert state_memory(n, 2, dp, "bf16") == (2000, 500, 3000)
    assert state_memory(n, 3, dp, "bf16") == (500, 500, 3000)
    assert state_memory(n, 0, dp, "fp32") == (4000, 4000, 8000)


def test_activation_estimate_by_hand_and_its_trends():
    cfg = load_config("configs/6.7b.yaml", ["train.recompute=false"])
    lo = make_layout(cfg)
    s, h, a, t, c = 2048, 4096, 16, 4, 256
    per_layer = s * h * (10 + 24 / t) + 5 * a * s * c / t
    assert activation_memory(cfg, lo, 0) == pytest.approx(16 * per_layer * 2)  # 2 micro-batches in flight
    last = 16 * per_layer * 1 + 2 * 4 * s * 32000 / t
    assert activation_memory(cfg, lo, 1) == pytest.approx(last)
    recompute = load_config("configs/6.7b.yaml", ["train.recompute=true"])
    assert activation_memory(recompute, lo, 0) < activation_memory(cfg, lo, 0) / 5
    bigger = load_config("configs/6.7b.yaml", ["train.recompute=false", "train.micro_batch_size=2"])
    assert activation_memory(bigger, make_layout(bigger), 0) == pytest.approx(
        2 * activation_memory(cfg, lo, 0)
    )


def test_plan_of_6_7b_fits_80gb():
    plan = make_plan(load_config("configs/6.7b.yaml"))
    worst = plan.stage_memory[plan.worst_stage]
    assert 4 * GIB < worst.total < 0.9 * 80 * GIB
    text = format_plan(plan)
    assert "TP=4 x PP=2 x DP=4" in text and "6,705,127,424" in text and "ZeRO-1" in text


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (
            ["launch.gpus_per_node=3"],
            "world size 12 is not divisible by parallel.tensor*parallel.pipeline=4*2=8",
        ),
        (["launch.nodes=3"], "train.global_batch_size=2048 is not divisible by"),
        (["parallel.tensor=1", "parallel.pipeline=1", "launch.gpu_mem_gb=16"], "does not fit"),
        # (ZeRO-0 under a pipeline needs clipping off: the trainer refuses it otherwise)
        (["parallel.zero_stage=0", "optimizer.clip_grad=0", "launch.gpu_mem_gb=12"], "does not fit"),
    ],
)
def test_impossible_layouts_are_refused(overrides, reason):
    with pytest.raises(PlanError, match=reason.replace("*", r"\*")):
        make_plan(load_config("configs/6.7b.yaml", overrides))


def test_context_parallel_in_the_plan():
    """CP splits the sequence: each rank's activations are those of T / CP tokens (by hand: the same
    model at T / CP without CP), ZeRO shards over DP x CP, and the layout and context are printed."""
    base = ["train.recompute=false", "data.seq_length=65536", "train.global_batch_size=64"]
    cp = load_config("configs/6.7b.yaml", [*base, "parallel.context_parallel=4", "launch.nodes=16"])
    lo = make_layout(cp)
    assert (lo.world, lo.tp, lo.cp, lo.pp, lo.dp, lo.local_seq_length) == (128, 4, 4, 2, 4, 16384)
    short = load_config("configs/6.7b.yaml", ["train.recompute=false", "data.seq_length=16384",
                                               "train.global_batch_size=64", "launch.nodes=4"])
    short_layout = make_layout(short)
    for stage in (0, 1):
        expected = activation_memory(short, short_layout, stage)
        assert activation_memory(cp, lo, stage) == pytest.approx(expected)
    plan = make_plan(cp, check_fit=False)
    params = plan.stage_params[0]
    assert plan.stage_memory[0].optimizer == pytest.approx(12 * params / (4 * 4))  # over DP x CP
    text = format_plan(plan)
    assert "TP=4 x CP=4 x PP=2 x DP=4" in text
    assert "65,536 tokens per sequence split over CP=4: 16,384 per rank" in text


def test_1_3b_256k_fits_one_node_of_80gb_and_not_without_cp():
    cfg = load_config("configs/1.3b-256k.yaml")
    plan = make_plan(cfg)
    assert (plan.layout.world, plan.layout.cp, plan.layout.seq_length) == (8, 8, 262144)
    assert plan.stage_memory[0].total < 0.9 * 80 * GIB
    with pytest.raises(PlanError, match="does not fit"):
        make_plan(load_config("configs/1.3b-256k.yaml", ["parallel.context_parallel=1",
                                                          "train.global_batch_size=16"]))
