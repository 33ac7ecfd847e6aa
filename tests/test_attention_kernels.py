"""Which kernel each attention path can run on (megaret/ops/attention_backend.py), on the CPU:

- block-windowed attention folds its blocks into SDPA's batch under `causal_lower_right` and
  equals the masked implementation (fp64, forward and gradients), a partial last block included;
- the training forward of every attention arch hands SDPA no mask tensor (so SDPA's flash kernel
  can take every call on a GPU; tests/test_attention_gpu.py proves it there);
- the FlexAttention path of document masks (eager here: forward only) equals the boolean-mask path.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from torch.overrides import TorchFunctionMode

from megaret.config import load_config
from megaret.models.spec import SPECS, build_model
from megaret.ops import attention_backend
from megaret.ops.attention import (
    attend_to_cache,
    blockwise_window_attention,
    cached_attention,
    key_masked_attention,
    masked_blockwise_window_attention,
    naive_attention,
    visible,
)
from megaret.ops.attention_backend import masked_kernel, masked_kernel_forced
from megaret.parallel.megatron_config import megatron_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def qkv(b: int, h: int, t: int, d: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


class SDPAMasks(TorchFunctionMode):
    """Records the attn_mask of every scaled_dot_product_attention call (each call runs as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# block windows without a mask tensor


@pytest.mark.parametrize("w, t, prev", [
    (4, 12, "none"),  # whole blocks, no cached block
    (4, 14, "valid"),  # a partial last block after a cached one
    (8, 19, "mixed"),  # sample 1 dropped its cached block
    (8, 5, "mixed"),  # one partial block: the first block is the last
    (5, 10, "invalid"),
])
def test_folded_blocks_equal_the_masked_window(w, t, prev):
    b, h, d = 3, 2, 8
    q, k, v = qkv(b, h, w + t, d, seed=t)
    valid = {"none": None, "valid": [True] * b, "mixed": [True, False, True], "invalid": [False] * b}[prev]
    valid = None if valid is None else torch.tensor(valid)
    pos = torch.arange(w + t)
    seg = (q[:, :, w:], k[:, :, w:], v[:, :, w:])
    if prev == "none":  # the segment alone, from position 0
        ref = naive_attention(*seg, visible(pos[:t], pos[:t], w))
        cached = (None, None, None)
    else:  # the segment's queries over [cached block; segment], the cached keys of invalid samples masked
        mask = visible(pos[w:], pos, w)[None, None].repeat(b, 1, 1, 1)  # (B, 1, t, w + t)
        mask[:, :, :, :w] &= valid[:, None, None, None]
        ref = naive_attention(q[:, :, w:], k, v, mask)
        cached = (k[:, :, :w], v[:, :, :w], valid)
    out = blockwise_window_attention(*seg, w, *cached)
    assert rel(out, ref) < 1e-12
    # the implementation it replaces: one masked SDPA over every block (whole blocks), else the general path
    if t % w == 0:
        before = masked_blockwise_window_attention(*seg, w, *cached)
    else:
        at, cache_valid = (0, None) if cached[0] is None else (w, cached[2][:, None].expand(b, w))
        before = cached_attention(*seg, at, w, cached[0], cached[1], cache_valid)
    assert rel(out, before) < 1e-12
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel(g, r) < 1e-12


ATTENTION_ARCHS = [name for name, spec in SPECS.items() if spec.attention]


def tiny(arch: str, ctx, *overrides: str, dtype=torch.float32):
    cfg = load_config(f"configs/{arch}-tiny.yaml", ["model.dropout=0.0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel, params_dtype=dtype), ctx.tp)
    return cfg, model.to(dtype)


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_training_forward_gives_sdpa_no_mask_tensor(ctx1, arch):
    """Segments with a carried (partly reset) cache, forward and backward: every SDPA call is
    mask-free or causal_lower_right (the archs whose spec names block windows), so none needs
    SDPA's math kernel."""
    cfg, model = tiny(arch, ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 72), generator=torch.Generator().manual_seed(2))
    spy = SDPAMasks()
    with spy:
        first = model(x[:, :32], x[:, :32])
        if model.carries_state:  # the causal Transformer's cache is for decoding
            restart = torch.tensor([False, True])
            second = model(x[:, 32:64], x[:, 32:64], state=first.state.detach(), restart=restart)
            (first.loss.sum() + second.loss.sum()).backward()
        else:
            first.loss.sum().backward()
    assert spy.masks and all(m is None or isinstance(m, CausalBias) for m in spy.masks), \
        {type(m).__name__ for m in spy.masks}
    windowed = "block_window" in SPECS[arch].attention
    assert any(isinstance(m, CausalBias) for m in spy.masks) == windowed


# --------------------------------------------------------------------------------------------
# document masks on FlexAttention (eager on the CPU: forward only)


def test_kernel_choice_is_one_place_and_logged_once(caplog):
    attention_backend._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="megaret.ops"):
        assert masked_kernel(torch.device("cpu")) == "sdpa"
        assert masked_kernel(torch.device("cpu")) == "sdpa"
        assert masked_kernel(torch.device("cuda", 0)) == "flex"
        with masked_kernel_forced("flex"):
            assert masked_kernel(torch.device("cpu")) == "flex"
    assert masked_kernel(torch.device("cpu")) == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention on ")]
    assert len(lines) == 3, lines  # cpu/sdpa, cuda/flex, cpu/flex: each once
    with pytest.raises(ValueError, match="use 'flex' or 'sdpa'"), masked_kernel_forced("math"):
        pass


def docs(b: int, t: int, starts: list[list[int]]) -> torch.Tensor:
    """(B, T) long document ids, 0 continuing the history, +1 at each start."""
    doc_start = torch.zeros(b, t, dtype=torch.bool)
    for i, s in enumerate(starts):
        doc_start[i, s] = True
    return doc_start.long().cumsum(1)


@pytest.mark.parametrize("window, cache", [(None, 0), (16, 0), (16, 16), (None, 9)])
def test_flex_document_attention_equals_boolean_masks(window, cache):
    """T = 150 (two query tiles of 128), documents starting mid-block, a cache with dropped keys."""
    b, h, t, d = 2, 2, 150, 8
    q, k, v = (x.detach() for x in qkv(b, h, cache + t, d, seed=3, dtype=torch.float32))
    doc = docs(b, t, [[0, 37, 80], [64, 140]])
    key_valid = None
    if cache:
        key_valid = torch.ones(b, cache + t, dtype=torch.bool)
        key_valid[1, :cache] = False  # sample 1 dropped its history
    args = (q[:, :, cache:], k, v, cache, window, key_valid, None, doc)
    with torch.no_grad():
        ref = attend_to_cache(*args)
        with masked_kernel_forced("flex"):
            out = attend_to_cache(*args)
            again = attend_to_cache(*args)  # the block mask is reused (same doc tensor)
    assert rel(out, ref) < 1e-5 and torch.equal(out, again)


def test_flex_key_mask_equals_boolean_masks():
    q = torch.randn(2, 2, 4, 8)  # (B, H, S states, D)
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    keep = torch.arange(16)[None, :] >= torch.tensor([[5], [0]])  # (B, W): the block's last document
    ref = key_masked_attention(q, k, v, keep, scale=1.0)
    with masked_kernel_forced("flex"):
        out = key_masked_attention(q, k, v, keep, scale=1.0)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_packed_documents_on_flex_equal_boolean_masks(ctx1, arch):
    """Each arch's layers with document starts (mid-block, at a segment start and at a block
    boundary): the FlexAttention path equals the boolean-mask one."""
    cfg, model = tiny(arch, ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
    doc_start = torch.zeros(2, 64, dtype=torch.bool)
    doc_start[0, [0, 5, 50]] = True  # 5 .. 49 spans more than the window
    doc_start[1, [16, 40]] = True
    with torch.no_grad():
        ref = model(x, doc_start=doc_start).logits
        with masked_kernel_forced("flex"):
            out = model(x, doc_start=doc_start).logits
    assert rel(out, ref) < 1e-5
