"""Single-GPU smoke tests: the tiny RetNet runs forward and backward in bf16 on CUDA (TP=1, on the
CPU-ranked `ctx1` world), and the trainer runs bf16 steps in a launched rank on NCCL (CPU adapters off)."""

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
        ref = model(x, retention_mode="parallel").logits.float()
        got = model(x, retention_mode="chunk").logits.float()
    assert (got - ref).norm() / ref.norm() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_bf16_steps_on_cuda(tmp_path):
    """The trainer (DeepSpeed ZeRO-1 bf16, megatron schedule, eval) runs a few steps on the GPU."""
    import json

    from tests.conftest import run_distributed

    proc = run_distributed("train_features.py", 1, "gpu", str(tmp_path), gpu=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["device"].startswith("cuda")
    assert r["backend"] == "nccl" and r["cpu_adapters"] is False  # parallel.backend=auto on a GPU
    assert all(v == v for v in r["losses"]) and r["losses"][-1] < r["losses"][0]
    assert len(r["evals"]) == 2
