"""Single-GPU smoke test: the tiny RetNet runs forward and backward in bf16 on CUDA (TP=1)."""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.retnet import RetNet
from megaret.parallel.megatron_config import megatron_config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_retnet_bf16_forward_backward_on_cuda(ctx1):
    cfg = load_config("configs/tiny.yaml")
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp).cuda().to(torch.bfloat16)
    x = torch.randint(cfg.model.vocab_size, (2, cfg.data.seq_length), device="cuda")
    out = model(x, torch.roll(x, -1, 1))
    loss = out.loss.mean()
    loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # the chunkwise and parallel forms agree within bf16 tolerance
        ref = model(x, mode="parallel").logits.float()
        got = model(x, mode="chunk").logits.float()
    assert (got - ref).norm() / ref.norm() < 2e-2
