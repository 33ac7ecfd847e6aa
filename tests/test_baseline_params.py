"""The Transformer baselines match their RetNet counterparts' parameter counts (within 2%),
and every closed-form count equals the model actually built (on the meta device: no memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaret.config import load_config
from megaret.models.spec import build_model, param_count
from megaret.parallel.megatron_config import megatron_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SINGLE = ["parallel.tensor=1", "parallel.pipeline=1"]  # count the whole model in one process


def built_count(cfg, ctx1) -> int:
    with torch.device("meta"):
        model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", ["1.3b", "2.7b", "6.7b"])
def test_baseline_matches_retnet_within_2_percent(size, ctx1):
    retnet = load_config(CONFIGS / f"{size}.yaml", SINGLE)
    base = load_config(CONFIGS / f"transformer-{size}.yaml", SINGLE)
    n_retnet, n_base = param_count(retnet.model), param_count(base.model)
    assert built_count(retnet, ctx1) == n_retnet
    assert built_count(base, ctx1) == n_base
    diff = n_base / n_retnet - 1
    print(f"{size}: RetNet {n_retnet:,} vs Transformer {n_base:,} ({diff:+.3%})")
    assert abs(diff) <= 0.02
    # the same shell and recipe: only the token mixer (and FFN width) differ
    r, b = retnet.model, base.model
    assert (b.arch, b.num_layers, b.hidden_size, b.vocab_size, b.ffn_type) == (
        "transformer", r.num_layers, r.hidden_size, r.vocab_size, r.ffn_type,
    )  # fmt: skip
    assert base.optimizer == retnet.optimizer and base.data.seq_length == retnet.data.seq_length
    assert base.train.global_batch_size == retnet.train.global_batch_size


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("transformer-tiny", []),
        ("sliding-tiny", ["model.norm_type=rmsnorm", "model.tie_embeddings=true"]),
        ("brt-tiny", []),
        ("brt-tiny", ["model.gate_type=lstm", "model.state_skip=false", "model.ffn_type=swiglu"]),
        ("brt-tiny", ["model.state_skip=false", "model.norm_type=rmsnorm", "model.recurrent_layers=[0, -1]"]),
        ("brt-12l", SINGLE),
        ("brt-24l", SINGLE),
    ],
)
def test_closed_form_counts_equal_the_built_model(name, overrides, ctx1):
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    n = param_count(cfg.model)
    print(f"{name} {overrides}: {n:,}")
    assert built_count(cfg, ctx1) == n


def test_paper_brt_configs():
    twelve = load_config(CONFIGS / "brt-12l.yaml").model
    assert (twelve.num_layers, twelve.num_states, twelve.block_size, twelve.recurrent_layer_indices) == (
        12, 512, 512, [9],
    )  # fmt: skip
    assert (twelve.gate_type, twelve.state_skip) == ("fixed", True)
    assert load_config(CONFIGS / "brt-12l.yaml").data.seq_length == 4096
    assert load_config(CONFIGS / "brt-24l.yaml").model.recurrent_layer_indices == [9, 19]
