"""Attention ops against a naive masked softmax, and the Transformer / sliding-window models'
caches: segment-by-segment and token-by-token decoding reproduce one full forward."""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.spec import build_model
from megaret.ops.attention import (
    attend_to_cache,
    blockwise_window_attention,
    cached_attention,
    naive_attention,
    visible,
)
from megaret.parallel.megatron_config import megatron_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def qkv(b: int, h: int, t: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=gen, dtype=torch.float64) for _ in range(3)]


# --------------------------------------------------------------------------------------------
# ops


def test_visible_is_the_block_window():
    pos = torch.arange(8)
    m = visible(pos, pos, 4)
    assert m[5].tolist() == [True] * 6 + [False] * 2  # block 1 sees block 0 and itself causally
    assert m[7, 0] and not m[3, 4]
    far = visible(torch.tensor([9]), pos, 4)  # block 2 sees block 1 only (positions 4..)
    assert far[0].tolist() == [False] * 4 + [True] * 4


@pytest.mark.parametrize("window, blocks", [(4, 3), (8, 2), (5, 1)])
def test_blockwise_with_cached_previous_block_equals_full_masked_attention(window, blocks):
    """Segment of `blocks` blocks after a cached previous block == full attention under the mask."""
    b, h, d = 2, 3, 8
    t = window * (blocks + 1)
    q, k, v = qkv(b, h, t, d)
    pos = torch.arange(t)
    ref = naive_attention(q, k, v, visible(pos, pos, window))[:, :, window:]
    w = window
    out = blockwise_window_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w, k[:, :, :w], v[:, :, :w])
    assert rel(out, ref) < 1e-12
    # the general (decoding) path agrees too
    out = cached_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w, w, k[:, :, :w], v[:, :, :w],
                           torch.ones(b, w, dtype=torch.bool))
    assert rel(out, ref) < 1e-12
    # no cache: the first block sees only itself
    first = naive_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], visible(pos[w:] - w, pos[w:] - w, w))
    assert rel(blockwise_window_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w), first) < 1e-12


def test_invalid_previous_block_is_ignored_per_sample():
    w, d = 4, 8
    q, k, v = qkv(2, 2, 2 * w, d, seed=1)
    valid = torch.tensor([True, False])
    prev = (k[:, :, :w], v[:, :, :w])
    out = blockwise_window_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w, *prev, valid)
    fresh = blockwise_window_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w)
    with_prev = blockwise_window_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w, k[:, :, :w], v[:, :, :w])
    assert torch.allclose(out[1], fresh[1]) and torch.allclose(out[0], with_prev[0])
    general = cached_attention(q[:, :, w:], k[:, :, w:], v[:, :, w:], w, w, k[:, :, :w], v[:, :, :w],
                               valid[:, None].expand(2, w))
    assert rel(general, out) < 1e-12


def test_full_causal_with_kv_cache():
    q, k, v = qkv(2, 2, 10, 8, seed=2)
    pos = torch.arange(10)
    ref = naive_attention(q, k, v, visible(pos, pos, None))
    out = cached_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], 6, None, k[:, :, :6], v[:, :, :6])
    assert rel(out, ref[:, :, 6:]) < 1e-12
    assert rel(cached_attention(q, k, v, 0, None), ref) < 1e-12


def test_attention_over_a_preallocated_cache_view():
    """The new tokens' queries over views of a larger buffer that already holds their keys:
    one query unmasked, several causally masked, invalid history masked per sample."""
    q, k, v = qkv(2, 2, 12, 8, seed=3)
    kb, vb = torch.zeros(2, 2, 20, 8, dtype=torch.float64), torch.zeros(2, 2, 20, 8, dtype=torch.float64)
    kb[:, :, :12], vb[:, :, :12] = k, v  # capacity 20, 12 entries written
    pos = torch.arange(12)
    ref = naive_attention(q, k, v, visible(pos, pos, None))
    one = attend_to_cache(q[:, :, 11:], kb[:, :, :12], vb[:, :, :12], 11)
    assert rel(one, ref[:, :, 11:]) < 1e-12
    several = attend_to_cache(q[:, :, 8:], kb[:, :, :12], vb[:, :, :12], 8)
    assert rel(several, ref[:, :, 8:]) < 1e-12
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :8] = False  # sample 1 dropped its history before position 8
    masked = attend_to_cache(q[:, :, 8:], kb[:, :, :12], vb[:, :, :12], 8, key_valid=valid)
    fresh = naive_attention(q[1:, :, 8:], k[1:, :, 8:], v[1:, :, 8:], visible(pos[8:], pos[8:], None))
    assert rel(masked[:1], ref[:1, :, 8:]) < 1e-12 and rel(masked[1:], fresh) < 1e-12


# --------------------------------------------------------------------------------------------
# models


def build(name: str, ctx1, *overrides: str):
    cfg = load_config(f"configs/{name}.yaml", list(overrides))
    torch.manual_seed(0)
    config = megatron_config(cfg.model, cfg.parallel, params_dtype=torch.float64)
    model = build_model(cfg.model, config, ctx1.tp)
    return cfg, model.double().eval()


@pytest.mark.parametrize("name", ["transformer-tiny", "sliding-tiny"])
def test_decoding_with_cache_reproduces_the_full_forward(name, ctx1):
    cfg, model = build(name, ctx1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(cfg.model.vocab_size, (2, 40), generator=gen)
    with torch.no_grad():
        full = model(x).logits
        # uneven pieces: a prompt, single tokens across block boundaries, then a block-aligned chunk
        pieces, state, outs, at = [13, 1, 1, 1, 16, 1, 7], None, [], 0
        for n in pieces:
            out = model(x[:, at:at + n], state=state)
            outs.append(out.logits)
            state, at = out.state, at + n
    assert at == 40 and state.position == 40
    assert rel(torch.cat(outs, dim=1), full) < 1e-10
    if cfg.model.arch == "sliding":  # the cache holds at most the previous block + the current one
        assert all(s.k.shape[2] <= 2 * cfg.model.block_size for s in state.layers)
    assert model.carries_state == (cfg.model.arch == "sliding")


def test_sliding_segments_equal_one_long_call(ctx1):
    cfg, model = build("sliding-tiny", ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x, x).loss
        first = model(x[:, :32], x[:, :32])
        second = model(x[:, 32:], x[:, 32:], state=first.state)
    assert rel(torch.cat([first.loss, second.loss], dim=1), full) < 1e-10


def test_sliding_window_differs_from_full_attention_only_beyond_the_window(ctx1):
    """Same weights: inside the first two blocks both models see the same keys."""
    _, sliding = build("sliding-tiny", ctx1)
    _, full = build("transformer-tiny", ctx1)
    full.load_state_dict(sliding.state_dict())
    x = torch.randint(512, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = sliding(x).logits, full(x).logits
    assert rel(a[:, :32], b[:, :32]) < 1e-10
    assert rel(a[:, 32:], b[:, 32:]) > 1e-6


def test_reset_drops_the_cached_history(ctx1):
    cfg, model = build("sliding-tiny", ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        first = model(x[:, :32])
        cont = model(x[:, 32:], state=first.state, restart=torch.tensor([False, True]))
        fresh = model(x[:, 32:])
        carried = model(x[:, 32:], state=first.state)
    assert rel(cont.logits[1], fresh.logits[1]) < 1e-10
    assert rel(cont.logits[0], carried.logits[0]) < 1e-10
    assert rel(cont.logits[0], fresh.logits[0]) > 1e-6
