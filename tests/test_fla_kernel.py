"""flash-linear-attention's Triton retention kernel computes what megaret's PyTorch ops do
(same decays 1 - 2^(-5-h), state (B, H, Dk, Dv), no scaling inside the op). GPU only; fla is
imported lazily and the test skips when it is not installed."""

from __future__ import annotations

import inspect

import pytest
import torch

from megaret.ops import chunk_retention, retnet_log_decay


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("t", [256, 1000])
def test_fla_chunk_retention_matches_pytorch_ops(t):
    fla_retention = pytest.importorskip("fla.ops.retention", reason="flash-linear-attention not installed")
    b, h, dk, dv = 2, 4, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(b, t, h, dk, device="cuda", generator=g) * dk**-0.5 for _ in range(2))
    v = torch.randn(b, t, h, dv, device="cuda", generator=g)
    s0 = torch.randn(b, h, dk, dv, device="cuda", generator=g) * 0.1
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    ref_o, ref_s = chunk_retention(*leaves[:3], retnet_log_decay(h).cuda(), leaves[3], chunk_size=64)
    (ref_o.square().sum() + ref_s.square().sum()).backward()
    ref_grads = [x.grad for x in leaves]

    fn = fla_retention.chunk_retention
    kw = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o, s = fn(*leaves[:3], scale=1.0, initial_state=leaves[3], output_final_state=True, **kw)
    (o.square().sum() + s.square().sum()).backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(o, ref_o) < 5e-3  # fla computes in tf32 on tensor cores
    assert rel(s, ref_s) < 5e-3
    for x, ref in zip(leaves, ref_grads, strict=True):
        assert rel(x.grad, ref) < 1e-2
