"""Generation carries state exactly: recurrent RetNet decoding, BRT block decoding and the
Transformer's KV cache give the tokens (and logits) that recomputing the full forward pass
at every step gives; sampling honours top-k / top-p and the seed; the CLI streams text."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megaret.config import load_config
from megaret.infer.decoding import generate, make_decoder, sample_next
from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config
from tests.conftest import REPO


def build(ctx1, name: str, *overrides: str, dtype: torch.dtype = torch.float64):
    cfg = load_config(f"configs/{name}.yaml", list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel, params_dtype=dtype), ctx1.tp)
    return cfg, model.to(dtype).eval()


def prompt(cfg, b: int = 2, t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(cfg.model.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_recompute(model, ids: torch.Tensor, n: int, **forward_kwargs) -> tuple[torch.Tensor, list]:
    """Reference: the whole sequence through the full forward at every step, no carried state."""
    logits = []
    for _ in range(n):
        last = model.gather_logits(model(ids, **forward_kwargs).logits)[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def decoded_logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits the state-carrying decoder produces along a fixed token sequence."""
    dec = make_decoder(model)
    with torch.no_grad():
        out = [dec.prefill(ids[:, :1])]
        out += [dec.step(ids[:, i]) for i in range(1, ids.shape[1])]
    return out


def test_retnet_recurrent_decoding_matches_parallel_recompute(ctx1):
    cfg, model = build(ctx1, "tiny")
    x = prompt(cfg, t=21)  # not a multiple of the chunk (16): prefill crosses a chunk boundary
    got = generate(model, x, 24, greedy=True)
    want, want_logits = greedy_recompute(model, x, 24, retention_mode="parallel")
    assert torch.equal(got, want)
    # the logits themselves agree (not only their argmax): token by token from position 0
    dec = decoded_logits(model, want)
    for i, ref in enumerate(want_logits):
        t = x.shape[1] - 1 + i
        assert (dec[t] - ref).abs().max() < 1e-9 * ref.abs().max()


def test_retnet_decoder_uses_the_recurrent_step(ctx1, monkeypatch):
    """Each generated token is one mode='recurrent' call of length 1 (O(1) per token)."""
    cfg, model = build(ctx1, "tiny")
    calls = []
    forward = model.forward

    def spy(tokens, labels=None, *, state=None, retention_mode=None):
        calls.append((tokens.shape[1], retention_mode))
        return forward(tokens, labels, state=state, retention_mode=retention_mode)

    monkeypatch.setattr(model, "forward", spy)
    generate(model, prompt(cfg, t=5), 6, greedy=True)
    assert calls == [(5, "chunk")] + [(1, "recurrent")] * 5


@pytest.mark.parametrize("name", ["transformer-tiny", "sliding-tiny"])
def test_transformer_kv_cache_generation_matches_recompute(ctx1, name):
    cfg, model = build(ctx1, name)
    x = prompt(cfg, t=9)
    # causal: generate() reserves the cache once, while decoded_logits (one prompt token, then
    # steps) grows it across reallocations (capacity 64 -> 128); sliding: the window slides
    n = 70 if name == "transformer-tiny" else 2 * cfg.model.block_size
    got = generate(model, x, n, greedy=True)
    want, want_logits = greedy_recompute(model, x, n)
    assert torch.equal(got, want)
    dec = decoded_logits(model, want)
    for i, ref in enumerate(want_logits):
        assert (dec[x.shape[1] - 1 + i] - ref).abs().max() < 1e-9 * ref.abs().max()


def brt_reference(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, list]:
    """BRT's full forward on the block-padded sequence (its only legal call), read at the last token."""
    w = model.cfg.block_size
    logits = []
    with torch.no_grad():
        for _ in range(n):
            t = ids.shape[1]
            padded = torch.cat([ids, ids.new_zeros(ids.shape[0], -t % w)], dim=1)
            last = model.gather_logits(model(padded).logits)[:, t - 1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


@pytest.mark.parametrize("t0", [5, 32])  # inside the first block; exactly two blocks
def test_brt_generation_equals_full_forward(ctx1, t0):
    cfg, model = build(ctx1, "brt-tiny")
    x = prompt(cfg, t=t0)
    n = cfg.model.block_size + 3  # crosses a block boundary while decoding
    got = generate(model, x, n, greedy=True)
    want, want_logits = brt_reference(model, x, n)
    assert torch.equal(got, want)
    dec = decoded_logits(model, want)
    for i, ref in enumerate(want_logits):
        assert (dec[t0 - 1 + i] - ref).abs().max() < 1e-9 * ref.abs().max()


def test_brt_padding_is_invisible(ctx1):
    """Changing the padding of the partial block does not change the read position's logits."""
    cfg, model = build(ctx1, "brt-tiny")
    x = prompt(cfg, b=1, t=cfg.model.block_size)
    with torch.no_grad():
        a = model(x).logits[:, :5]
        y = x.clone()
        y[:, 5:] = torch.randint(cfg.model.vocab_size, (1, x.shape[1] - 5))
        b = model(y).logits[:, :5]
    assert (a - b).abs().max() < 1e-12


def test_sampling_top_k_top_p_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, top_k=2, generator=g)
    assert set(k2.tolist()) == {0, 1}
    p = sample_next(logits, top_p=0.7, generator=g)  # 0.5 < 0.7 <= 0.8: ids 0 and 1
    assert set(p.tolist()) == {0, 1}
    assert abs((p == 0).float().mean().item() - 0.5 / 0.8) < 0.04
    full = sample_next(logits, generator=g)
    assert set(full.tolist()) == {0, 1, 2, 3}
    cold = sample_next(logits, temperature=0.05, generator=g)
    assert (cold == 0).float().mean() > 0.99
    a = sample_next(logits[:50], generator=torch.Generator().manual_seed(3))
    b = sample_next(logits[:50], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generate_streams_seeds_and_stops_at_eos(ctx1):
    cfg, model = build(ctx1, "tiny", dtype=torch.float32)
    x = prompt(cfg, t=4)
    seen = []
    a = generate(model, x, 12, temperature=1.0, top_k=50, seed=7, stream=seen.append)
    b = generate(model, x, 12, temperature=1.0, top_k=50, seed=7)
    assert torch.equal(a, b) and a.shape == (2, 16)
    assert torch.equal(torch.stack(seen, 1), a[:, 4:])
    eos = int(a[0, 4])  # the first sampled token of sample 0 as "eos": sample 0 then repeats it
    c = generate(model, x, 12, temperature=1.0, top_k=50, seed=7, eos_id=eos)
    assert (c[0, 4:] == eos).all()


def test_generate_cli_streams_text(tmp_path, ctx1):
    from megaret.data import train_tokenizer

    tok = train_tokenizer(["the retention state of the model " * 50], 300, tmp_path / "tok")
    cfg, model = build(ctx1, "tiny", dtype=torch.float32)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.generate", "--config", "configs/tiny.yaml", "--weights",
         str(tmp_path / "w.pt"), "--tokenizer", str(tok.path), "--prompt", "the state",
         "--max-new-tokens", "8", "--greedy"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = tok.encode("the state")
    want = generate(model, torch.tensor([ids]), 8, greedy=True, vocab_size=tok.vocab_size)[0].tolist()
    assert max(want) < tok.vocab_size
    assert proc.stdout.rstrip("\n") == tok.decode(want)
