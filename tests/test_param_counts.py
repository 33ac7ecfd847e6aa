"""Paper-size RetNets built on the meta device have exactly the closed-form parameter count."""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.retnet import RetNet
from megaret.models.spec import param_count as retnet_param_count
from megaret.parallel.megatron_config import megatron_config

NOMINAL = {"1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_paper_config_parameter_count(ctx1, name):
    cfg = load_config(f"configs/{name}.yaml", ["parallel.tensor=1", "parallel.pipeline=1"])
    with torch.device("meta"):
        model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
    built = sum(p.numel() for p in model.parameters())
    closed = retnet_param_count(cfg.model)
    print(f"{name}: {built:,} parameters ({built / NOMINAL[name]:.3f} x nominal)")
    assert built == closed
    assert abs(built / NOMINAL[name] - 1) <= 0.05


@pytest.mark.parametrize("extra", [[], ["model.ffn_type=swiglu"], ["model.tie_embeddings=true"],
                                   ["model.norm_type=rmsnorm", "model.value_factor=1"]])
def test_closed_form_matches_a_real_build(ctx1, extra):
    cfg = load_config("configs/tiny.yaml", extra)
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
    assert sum(p.numel() for p in model.parameters()) == retnet_param_count(cfg.model)
