"""GPU: each attention arch (causal Transformer, block-windowed sliding Transformer, BRT), with and
without packed documents, runs its training forward and backward in bf16 with SDPA restricted to
its flash kernel, so a call flash cannot take raises instead of falling back to the math kernel,
and document masks on compiled FlexAttention. Each is compared with the same weights in fp32 on
the CPU (boolean SDPA masks), loosely: the tolerances sit well above bf16's error (measured on
the CPU in bf16: loss 2.5e-4, gradients 7e-3, norm-relative) and well below what the masks change
(dropping the documents moves the loss 1.1e-2 and the gradients 0.35).

The model is built on the CPU-ranked `ctx1` world (TP=1: no collective runs) and moved to CUDA,
as tests/test_gpu_smoke.py does. Shapes: head dim 64, blocks of 64, T = 256 (two FlexAttention
tiles), 16 BRT states: the compiled kernels see two shapes, (T, T) and (states, block).
"""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.spec import SPECS, build_model
from megaret.ops import attention_flex
from megaret.ops.attention_backend import masked_kernel
from megaret.parallel.megatron_config import megatron_config

T = 256
SIZE = ["model.hidden_size=128", "model.num_heads=2", "model.ffn_hidden_size=256", "model.num_layers=2",
        "model.dropout=0.0", "model.vocab_size=512", "model.block_size=64", "model.num_states=16",
        "model.recurrent_layers=[1]"]  # (the last three apply to the archs that have them)
ARCHS = [name for name, spec in SPECS.items() if spec.attention]  # configs/<arch>-tiny.yaml
LOSS_TOL, GRAD_TOL = 3e-3, 5e-2


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative distance, in fp32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


def run(model, x: torch.Tensor, doc_start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward and backward: (per-token loss (B, T'), every gradient flattened). Without
    documents the windowed archs run a second segment on the carried state, one sample reset."""
    model.zero_grad()
    out = model(x, x, doc_start=doc_start)
    losses, total = [out.loss], out.loss.float().mean()
    if doc_start is None and model.carries_state:
        restart = torch.tensor([False, True], device=x.device)
        more = model(x.flip(1), x.flip(1), state=out.state.detach(), restart=restart)
        losses.append(more.loss)
        total = total + more.loss.float().mean()
    total.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return torch.cat(losses, dim=1), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_runs_on_flash_and_flex_in_bf16(ctx1, monkeypatch, arch, docs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = load_config(f"configs/{arch}-tiny.yaml", SIZE)

    def build():
        torch.manual_seed(0)
        return build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)

    x = torch.randint(cfg.model.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    doc_start = None
    if docs:  # starts mid-block, on a block boundary and at the sample start
        doc_start = torch.zeros(2, T, dtype=torch.bool)
        doc_start[0, [0, 45, 150]] = True
        doc_start[1, [64, 100, 230]] = True
    ref_loss, ref_grads = run(build(), x, doc_start)  # fp32 on the CPU: boolean SDPA masks

    flex_calls = []
    attend = attention_flex._attend

    def counted(*args, **kwargs):
        flex_calls.append(args[0].shape)
        return attend(*args, **kwargs)

    monkeypatch.setattr(attention_flex, "_attend", counted)
    assert masked_kernel(torch.device("cuda")) == "flex"
    model = build().cuda().to(torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # no math / memory-efficient fallback: it would raise
        loss, grads = run(model, x.cuda(), None if doc_start is None else doc_start.cuda())
    assert next(model.parameters()).dtype == torch.bfloat16 and torch.isfinite(grads).all()
    assert bool(flex_calls) == docs, f"{len(flex_calls)} FlexAttention calls"
    assert dist(loss, ref_loss) < LOSS_TOL, dist(loss, ref_loss)
    assert dist(grads, ref_grads) < GRAD_TOL, dist(grads, ref_grads)
