"""RetNet on megatron-core layers (one process): the three forms agree, decoding matches."""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.retnet import RetNet
from megaret.parallel.megatron_config import megatron_config

OVERRIDES = ["model.chunk_size=8", "model.num_layers=2", "model.vocab_size=96", "data.seq_length=64"]


def build(ctx, *extra: str, dtype=torch.float32) -> RetNet:
    cfg = load_config("configs/tiny.yaml", [*OVERRIDES, *extra])
    torch.manual_seed(7)
    return RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).to(dtype).eval()


def tokens(b: int, t: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_parallel_chunk_recurrent_logits_agree(ctx1, ffn):
    model = build(ctx1, f"model.ffn_type={ffn}")
    x = tokens(2, 37)  # not a multiple of the chunk size
    with torch.no_grad():
        ref = model(x, retention_mode="parallel")
        for mode in ("chunk", "recurrent"):
            out = model(x, retention_mode=mode)
            assert (out.logits - ref.logits).abs().max() <= 1e-5, mode
            for s, s_ref in zip(out.state.layers, ref.state.layers, strict=True):
                torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_forms_agree_in_fp64(ctx1):
    model = build(ctx1, dtype=torch.float64)
    x = tokens(2, 29)
    with torch.no_grad():
        ref = model(x, retention_mode="parallel").logits
        for mode in ("chunk", "recurrent"):
            assert (model(x, retention_mode=mode).logits - ref).abs().max() <= 1e-10, mode


def test_token_by_token_decoding_reproduces_parallel_logits(ctx1):
    model = build(ctx1)
    x = tokens(2, 21)
    with torch.no_grad():
        full = model(x, retention_mode="parallel").logits
        state = None
        steps = []
        for t in range(x.shape[1]):
            out = model(x[:, t : t + 1], state=state, retention_mode="recurrent")
            state = out.state
            steps.append(out.logits)
    assert state.position == x.shape[1]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_chunkwise_prefill_then_recurrent_steps(ctx1):
    """The generation path: chunkwise prompt, then O(1) steps, equals one parallel pass."""
    model = build(ctx1)
    x = tokens(1, 30)
    with torch.no_grad():
        full = model(x, retention_mode="parallel").logits
        prefill = model(x[:, :19], retention_mode="chunk")
        rest = []
        state = prefill.state
        for t in range(19, 30):
            out = model(x[:, t : t + 1], state=state, retention_mode="recurrent")
            state = out.state
            rest.append(out.logits)
    got = torch.cat([prefill.logits, *rest], dim=1)
    assert (got - full).abs().max() <= 1e-5


def test_segments_with_state_equal_one_call_and_gradients_flow(ctx1):
    model = build(ctx1).train()
    x = tokens(2, 32)
    labels = torch.roll(x, -1, dims=1)
    one = model(x, labels, retention_mode="chunk")
    a = model(x[:, :16], labels[:, :16], retention_mode="chunk")
    b = model(x[:, 16:], labels[:, 16:], state=a.state, retention_mode="chunk")
    torch.testing.assert_close(torch.cat([a.loss, b.loss], 1), one.loss, rtol=1e-5, atol=1e-5)
    one.loss.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_tied_embeddings_share_the_weight(ctx1):
    model = build(ctx1, "model.tie_embeddings=true")
    assert model.output.weight is None
    out = model(tokens(1, 8), tokens(1, 8))
    out.loss.mean().backward()
    assert model.embedding.weight.grad is not None


def test_wrong_state_length_is_a_clear_error(ctx1):
    model = build(ctx1)
    state = model.init_state(1)
    state.layers.pop()
    with pytest.raises(ValueError, match="state has 1 layers; this model has 2"):
        model(tokens(1, 4), state=state)


def test_loss_falls_on_a_learnable_task(ctx1):
    from megaret.train.batches import SyntheticBatches

    model = build(ctx1, "model.vocab_size=32").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = SyntheticBatches(vocab=32, seq_length=32, global_batch=4, dp_size=1, dp_rank=0, seed=0)
    losses = []
    for step in range(30):
        x, y = batches.next_batch(step)
        loss = model(x, y).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
