"""Block-Recurrent Transformer: block-by-block and segment-by-segment calls continue exactly,
gradients flow through handed-over state unless detached, document resets restore the
learned initial state, and every gate / skip variant trains."""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.brt_layer import BRTLayerState
from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build(ctx1, *overrides: str, dtype: torch.dtype = torch.float64, name: str = "brt-tiny"):
    cfg = load_config(f"configs/{name}.yaml", list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel, params_dtype=dtype), ctx1.tp)
    return cfg, model.to(dtype)


def tokens(cfg, t: int = 64, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(cfg.model.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def recurrent_states(state) -> list[BRTLayerState]:
    return [s for s in state.layers if isinstance(s, BRTLayerState)]


def test_block_by_block_equals_one_segment_call(ctx1):
    cfg, model = build(ctx1, "model.gate_type=lstm")
    x = tokens(cfg)
    w = cfg.model.block_size
    with torch.no_grad():
        full = model(x)
        state, logits = None, []
        for i in range(x.shape[1] // w):
            out = model(x[:, i * w:(i + 1) * w], state=state)
            logits.append(out.logits)
            state = out.state
    assert rel(torch.cat(logits, dim=1), full.logits) < 1e-10
    (a,), (b,) = recurrent_states(state), recurrent_states(full.state)
    assert a.state.shape == (2, cfg.model.num_states, cfg.model.hidden_size)
    assert rel(a.state, b.state) < 1e-10
    assert rel(a.cache.k, b.cache.k) < 1e-10


@pytest.mark.parametrize("detach", [False, True])
def test_two_segments_with_handed_over_state_equal_one_long_call(ctx1, detach):
    """Forward always matches; gradients match unless the state is detached (truncated BPTT)."""
    cfg, model = build(ctx1)
    x = tokens(cfg, t=128)
    model.zero_grad()
    model(x, x).loss.sum().backward()
    long_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first = model(x[:, :64], x[:, :64])
    state = first.state.detach() if detach else first.state
    second = model(x[:, 64:], x[:, 64:], state=state)
    (first.loss.sum() + second.loss.sum()).backward()
    with torch.no_grad():
        full_loss = model(x, x).loss
    assert rel(torch.cat([first.loss, second.loss], dim=1).detach(), full_loss) < 1e-10
    worst = max(rel(p.grad, long_grads[n]) for n, p in model.named_parameters())
    if detach:
        assert worst > 1e-6  # gradient truncated at the segment boundary
    else:
        assert worst < 1e-10


def test_state_reaches_beyond_the_attention_window(ctx1):
    """Changing block 0 changes block 4's logits through the recurrent state; a sliding-window
    model cannot: each of its 3 layers looks one block back, so block 4 never sees block 0."""
    cfg, brt = build(ctx1)
    _, sliding = build(ctx1, "model.arch=sliding")
    x = tokens(cfg, t=80, b=1)
    y = x.clone()
    y[:, :16] = (y[:, :16] + 1) % cfg.model.vocab_size
    with torch.no_grad():
        assert rel(brt(x).logits[:, 64:], brt(y).logits[:, 64:]) > 1e-6
        assert rel(sliding(x).logits[:, 64:], sliding(y).logits[:, 64:]) < 1e-12


def test_reset_restores_the_learned_initial_state(ctx1):
    cfg, model = build(ctx1)
    x = tokens(cfg, t=128)
    with torch.no_grad():
        first = model(x[:, :64])
        cont = model(x[:, 64:], state=first.state, restart=torch.tensor([False, True]))
        fresh = model(x[:, 64:])
        carried = model(x[:, 64:], state=first.state)
    assert rel(cont.logits[1], fresh.logits[1]) < 1e-10  # sample 1 starts a new document
    assert rel(cont.logits[0], carried.logits[0]) < 1e-10  # sample 0 continues its own
    assert rel(cont.logits[1], carried.logits[1]) > 1e-6
    (s_cont,), (s_fresh,) = recurrent_states(cont.state), recurrent_states(fresh.state)
    assert rel(s_cont.state[1], s_fresh.state[1]) < 1e-10
    # before any block, the state is the learned initial state
    layer = model.layers[cfg.model.recurrent_layer_indices[0]]
    assert torch.equal(layer.initial(2)[:, 0], layer.initial_state)


def test_calls_must_be_block_aligned(ctx1):
    cfg, model = build(ctx1)
    with pytest.raises(ValueError, match="block-aligned"):
        model(tokens(cfg, t=24))


@pytest.mark.parametrize("gate, skip", [("fixed", True), ("lstm", True), ("fixed", False), ("lstm", False)])
def test_variants_train(ctx1, gate, skip):
    """Loss falls within 30 steps on a tiny task: counting by 3 (mod 32) from a random start."""
    cfg, model = build(ctx1, f"model.gate_type={gate}", f"model.state_skip={str(skip).lower()}",
                       "model.vocab_size=32", "model.ffn_type=swiglu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        seq = (torch.randint(32, (4, 1), generator=gen) + 3 * torch.arange(33)) % 32  # (4, 33)
        loss = model(seq[:, :-1], seq[:, 1:]).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses


# --------------------------------------------------------------------------------------------
# config validation of the BRT / window keys


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.seq_length=72"], "data.seq_length=72 (the segment) is not a multiple of model.block_size=16"),
        (["model.arch=sliding", "data.seq_length=40"], "(e.g. 48) or change model.block_size"),
        (["model.recurrent_layers=[3]"], "model.recurrent_layers=[3] must be a non-empty list of layer "
                                         "indices in [-3, 2]"),
        (["model.recurrent_layers=[-4]"], "in [-3, 2] (model.num_layers=3)"),
        (["model.recurrent_layers=[]"], "model.recurrent_layers=[] must be a non-empty list"),
        (["model.recurrent_layers=[1, -2]"], "model.recurrent_layers=[1, -2] names the same layer twice"),
        (["model.num_states=0"], "model.num_states=0 must be > 0"),
        (["model.block_size=0"], "model.block_size=0 must be > 0"),
        (["model.gate_type=gru"], "model.gate_type: 'gru' is not one of fixed, lstm"),
    ],
)
def test_config_validation(overrides, expected):
    from megaret.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("configs/brt-tiny.yaml", overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_window_keys_do_not_constrain_other_archs():
    cfg = load_config("configs/transformer-tiny.yaml", ["data.seq_length=72", "model.recurrent_layers=[9]"])
    assert cfg.model.arch == "transformer"
    cfg = load_config("configs/brt-tiny.yaml", ["model.recurrent_layers=[-1]"])
    assert cfg.model.recurrent_layer_indices == [2]
