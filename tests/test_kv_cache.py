"""The causal Transformer's preallocated KV cache: appends write in place at the buffer's
frontier, never clobber another cache over the same buffer, reallocate O(log N) times for
N tokens, decode exactly like the full forward across reallocations, and serialise only the
live entries. Windowed (sliding / BRT) caches keep their trimmed, buffer-less behaviour."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

from megaret.config import load_config
from megaret.infer.generate import generate, make_decoder
from megaret.models import attention_layer
from megaret.models.attention_layer import KVBuffer, KVCache, grown_capacity
from megaret.models.factory import build_model
from megaret.parallel.megatron_config import megatron_config
from megaret.train.step import pack_state, unpack_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build(ctx1, name: str = "transformer-tiny"):
    cfg = load_config(f"configs/{name}.yaml", [])
    torch.manual_seed(0)
    config = megatron_config(cfg.model, cfg.parallel, params_dtype=torch.float64)
    model = build_model(cfg.model, config, ctx1.tp)
    return cfg, model.double().eval()


def kv(b: int, t: int, seed: int, h: int = 2, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


# --------------------------------------------------------------------------------------------
# the cache itself


def test_append_writes_in_place_at_the_frontier():
    k0, v0 = kv(2, 5, 0)
    cache = KVCache.with_capacity(k0, v0, capacity=8)
    assert (cache.length, cache.capacity) == (5, 8)
    k1, v1 = kv(2, 2, 1)
    grown = cache.append(k1, v1)
    assert grown.buffer is cache.buffer and grown.length == 7 and grown.k.data_ptr() == cache.k.data_ptr()
    assert torch.equal(grown.k, torch.cat([k0, k1], 2)) and torch.equal(grown.v, torch.cat([v0, v1], 2))
    assert grown.valid.all() and grown.all_valid()
    assert torch.equal(cache.k, k0) and cache.length == 5  # the older cache still sees its 5 entries
    # past the capacity: one copy into a geometrically larger buffer
    k2, v2 = kv(2, 3, 2)
    bigger = grown.append(k2, v2)
    assert bigger.buffer is not grown.buffer and bigger.capacity == grown_capacity(10) >= 10
    assert torch.equal(bigger.k, torch.cat([k0, k1, k2], 2))
    assert torch.equal(grown.k, torch.cat([k0, k1], 2))


def test_two_appends_from_the_same_cache_do_not_clobber_each_other():
    k0, v0 = kv(1, 4, 0)
    base = KVCache.with_capacity(k0, v0, capacity=64)
    (ka, va), (kb, vb) = kv(1, 1, 1), kv(1, 1, 2)
    a = base.append(ka, va)  # in place: the buffer's frontier moves to 5
    b = base.append(kb, vb)  # base is behind the frontier now: must copy, not overwrite entry 4
    assert a.buffer is base.buffer and b.buffer is not base.buffer
    assert torch.equal(a.k, torch.cat([k0, ka], 2)) and torch.equal(a.v, torch.cat([v0, va], 2))
    assert torch.equal(b.k, torch.cat([k0, kb], 2)) and torch.equal(b.v, torch.cat([v0, vb], 2))
    # both branches keep growing independently, and the re-run one writes in its own buffer
    (kc, vc), (kd, vd) = kv(1, 1, 3), kv(1, 1, 4)
    a2, b2 = a.append(kc, vc), b.append(kd, vd)
    assert a2.buffer is a.buffer and b2.buffer is b.buffer
    assert torch.equal(a2.k, torch.cat([k0, ka, kc], 2)) and torch.equal(b2.k, torch.cat([k0, kb, kd], 2))
    assert torch.equal(base.k, k0) and torch.equal(a.k, torch.cat([k0, ka], 2))


def test_decoding_n_tokens_reallocates_o_log_n_times():
    n = 4000
    k0, v0 = kv(1, 1, 0)
    cache = KVCache(k0, v0, torch.ones(1, 1, dtype=torch.bool))
    buffers, one = set(), kv(1, 1, 1)
    for _ in range(n):
        cache = cache.append(*one)
        buffers.add(id(cache.buffer))
    assert cache.length == n + 1 and cache.capacity < 2 * (n + 1)
    assert len(buffers) <= math.log(n, attention_layer.GROWTH) + 2, len(buffers)  # ~15, not ~4000


def test_reset_detach_and_grad_paths():
    k0, v0 = kv(2, 3, 0)
    cache = KVCache.with_capacity(k0, v0, capacity=16)
    assert cache.detach().buffer is cache.buffer and cache.reset(None) is cache
    dropped = cache.reset(torch.tensor([False, True]))
    assert dropped.valid.tolist() == [[True] * 3, [False] * 3] and not dropped.all_valid()
    nxt = dropped.append(*kv(2, 1, 1))  # a reset cache copies its validity into a new buffer
    assert nxt.buffer is not cache.buffer and nxt.valid.tolist() == [[True] * 4, [False] * 3 + [True]]
    assert not nxt.all_valid() and cache.valid.all()
    # under autograd appends concatenate (no in-place write into a tensor saved for backward)
    k1 = torch.randn(2, 2, 1, 4, requires_grad=True)
    out = cache.append(k1, k1 * 2)
    assert out.buffer is None and out.k.requires_grad
    out.k.sum().backward()
    assert k1.grad is not None and torch.equal(k1.grad, torch.ones_like(k1))


def test_serialisation_keeps_only_the_live_entries():
    k0, v0 = kv(2, 5, 0)
    cache = KVCache.with_capacity(k0, v0, capacity=1024)
    packed = pack_state(cache)  # what a checkpoint holds
    for name in ("k", "v", "valid"):
        t = packed["fields"][name]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    back = unpack_state(packed)
    assert torch.equal(back.k, k0) and back.buffer is None and back.capacity == 5
    buf = io.BytesIO()
    torch.save(cache, buf)  # plain pickling (torch.save / deepcopy) is compact too
    assert buf.tell() < 2 * 2 * k0.numel() * k0.element_size() + 4096
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.v, v0) and clone.buffer is None
    assert torch.equal(clone.append(k0[:, :, :1], v0[:, :, :1]).k, torch.cat([k0, k0[:, :, :1]], 2))


def test_from_buffers_takes_the_buffers_over():
    kb, vb = kv(1, 10, 0)
    cache = KVCache.from_buffers(kb, vb, None, 6)
    assert (cache.length, cache.capacity) == (6, 10) and cache.k.data_ptr() == kb.data_ptr()
    new = kv(1, 1, 1)
    out = cache.append(*new)
    assert torch.equal(kb[:, :, 6], new[0][:, :, 0]) and out.length == 7 and out.buffer is cache.buffer
    with pytest.raises(ValueError):
        KVBuffer(kb, vb[:, :, :5], torch.ones(1, 10, dtype=torch.bool), 3)


# --------------------------------------------------------------------------------------------
# the model


def test_greedy_decoding_across_reallocations_equals_the_full_forward(ctx1):
    """Token by token from one prompt token: the cache is reallocated a few times on the way
    (64 -> 128 -> 256 capacity) and every step's logits equal the full forward's."""
    cfg, model = build(ctx1)
    n = 150
    ids = torch.randint(cfg.model.vocab_size, (2, 1), generator=torch.Generator().manual_seed(7))
    dec = make_decoder(model)
    capacities, buffers = [], set()
    with torch.no_grad():
        logits = [dec.prefill(ids)]
        for _ in range(n - 1):
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
            logits.append(dec.step(ids[:, -1]))
            capacities.append(dec.state.layers[0].capacity)
            buffers.add(id(dec.state.layers[0].buffer))
        full = model(ids).logits  # (B, n, V)
    assert rel(torch.stack(logits, 1), full) < 1e-10
    assert sorted(set(capacities)) == [64, 128, 256] and len(buffers) == 3
    # the attention read the cache views in place: every layer's cache is a view of its buffer
    assert all(s.k.data_ptr() == s.buffer.k.data_ptr() and s.length == n for s in dec.state.layers)


def test_rerunning_a_step_from_the_same_state_is_exact(ctx1):
    """Branching: two different tokens from one state, then each branch continues; each equals
    the full forward of its own sequence (no branch overwrites the other's keys)."""
    cfg, model = build(ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        state = model(x[:, :9]).state
        state = model(x[:, 9:10], state=state).state  # now buffer-backed, with spare capacity
        a = model(x[:, 10:11], state=state)
        y = (x[:, 10:11] + 1) % cfg.model.vocab_size
        b = model(y, state=state)  # same state again: copies instead of overwriting position 10
        a2 = model(x[:, 11:12], state=a.state)
        b2 = model(x[:, 11:12], state=b.state)
        full_a = model(x).logits
        full_b = model(torch.cat([x[:, :10], y, x[:, 11:]], 1)).logits
    assert rel(torch.cat([a.logits, a2.logits], 1), full_a[:, 10:]) < 1e-10
    assert rel(torch.cat([b.logits, b2.logits], 1), full_b[:, 10:]) < 1e-10
    assert a.state.layers[0].buffer is state.layers[0].buffer
    assert b.state.layers[0].buffer is not state.layers[0].buffer


def test_reset_of_a_causal_cache_and_multi_token_calls(ctx1):
    cfg, model = build(ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        first = model(x[:, :10])
        grown = model(x[:, 10:20], state=first.state)  # a 10-token call over the cache (masked path)
        cont = model(x[:, 20:], state=grown.state, reset=torch.tensor([False, True]))
        step = model(x[:, 20:21], state=grown.state, reset=torch.tensor([False, True]))  # T = 1, masked
        full = model(x).logits
        fresh = model(x[:, 20:]).logits
    assert rel(torch.cat([first.logits, grown.logits, cont.logits], 1)[0], full[0]) < 1e-10
    assert rel(cont.logits[1], fresh[1]) < 1e-10
    assert rel(step.logits[1], fresh[1, :1]) < 1e-10 and rel(step.logits[0], full[0, 20:21]) < 1e-10


def test_generate_reserves_the_cache_once(ctx1, monkeypatch):
    """generate() preallocates prompt + max_new_tokens after the prefill: no copy while decoding."""
    cfg, model = build(ctx1)
    copies = []
    copy_of = KVBuffer.copy_of.__func__

    def spy(cls, cache, capacity, like=None):
        copies.append(capacity)
        return copy_of(cls, cache, capacity, like)

    monkeypatch.setattr(KVBuffer, "copy_of", classmethod(spy))
    x = torch.randint(cfg.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(10))
    out = generate(model, x, 100, greedy=True)
    assert out.shape == (2, 109)
    assert copies == [109] * cfg.model.num_layers  # the reservation, one per layer, and nothing else


def test_windowed_caches_stay_trimmed_and_bufferless(ctx1):
    cfg, model = build(ctx1, "sliding-tiny")
    x = torch.randint(cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        state = model(x[:, :13]).state
        for i in range(13, 40):
            state = model(x[:, i:i + 1], state=state).state
    assert all(s.buffer is None and s.length <= 2 * cfg.model.block_size for s in state.layers)


def test_prefill_into_an_empty_preallocated_cache(ctx1):
    """A length-0 cache over preallocated buffers: the prompt and the steps all go in place."""
    from megaret.models.transformer import TransformerState

    cfg, model = build(ctx1)
    h, d = cfg.model.num_heads, cfg.model.hidden_size // cfg.model.num_heads
    x = torch.randint(cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(12))
    empty = [KVCache.from_buffers(*(torch.zeros(2, h, 32, d, dtype=torch.float64) for _ in range(2)), None, 0)
             for _ in range(cfg.model.num_layers)]
    with torch.no_grad():
        out = model(x[:, :15], state=TransformerState(empty, 0))
        logits = [out.logits]
        state = out.state
        for i in range(15, 20):
            out = model(x[:, i:i + 1], state=state)
            logits.append(out.logits)
            state = out.state
        full = model(x).logits
    assert rel(torch.cat(logits, 1), full) < 1e-10
    assert all(s.buffer is e.buffer and s.length == 20 for s, e in zip(state.layers, empty, strict=True))
