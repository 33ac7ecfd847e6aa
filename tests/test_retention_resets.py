"""Document-boundary resets inside packed samples (issue 5, data.reset_at_doc_boundaries).

The retention ops take `reset` (B, T) bool: the state is zeroed just before every position
where a document starts. The three forms agree with resets anywhere (t = 0, chunk boundaries,
ragged last chunk), with and without an initial state, in outputs, final states and gradients;
a packed sample equals its documents run separately; the same holds for the whole RetNet
(rotary positions are not restarted at document starts: retention only sees relative
positions inside a document, which the tests below show).
"""

from __future__ import annotations

import pytest
import torch

from megaret.config import load_config
from megaret.models.retnet import RetNet
from megaret.ops import chunk_retention, parallel_retention, recurrent_retention, retention_step
from megaret.parallel.megatron_config import megatron_config

TOL = 1e-10
B, T, H, DK, DV = 3, 37, 2, 4, 6


def inputs(seed: int = 0, with_state: bool = True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, DK, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g, dtype=torch.float64)
    log_decay = torch.log(1 - 2.0 ** -torch.tensor([3.0, 6.0], dtype=torch.float64))
    s0 = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64) if with_state else None
    reset = torch.rand(B, T, generator=g) < 0.15
    reset[0, 0] = True  # a reset at the very first token (the initial state never counts)
    reset[1, 0] = False
    reset[1, 16] = reset[1, 8] = True  # on chunk boundaries (C = 8, 16)
    reset[1, 9] = True  # two documents starting back to back
    reset[2] = False
    reset[2, T - 1] = True  # a one-token last document
    return q, k, v, log_decay, s0, reset


def run(form, q, k, v, log_decay, s0, reset, chunk_size=None):
    if form == "parallel":
        return parallel_retention(q, k, v, log_decay, s0, reset)
    if form == "recurrent":
        return recurrent_retention(q, k, v, log_decay, s0, reset)
    return chunk_retention(q, k, v, log_decay, s0, chunk_size=chunk_size, reset=reset)


FORMS = [("recurrent", None), ("chunk", 1), ("chunk", 5), ("chunk", 8), ("chunk", 16), ("chunk", 64)]


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree_with_resets_outputs_states_and_gradients(with_state):
    base = inputs(1, with_state)
    w_o = torch.randn(B, T, H, DV, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    w_s = torch.randn(B, H, DK, DV, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    def outputs_and_grads(form, chunk_size):
        q, k, v, lg, s0, reset = (t.clone().requires_grad_(t.dtype.is_floating_point and t.dim() > 1)
                                  if t is not None else None for t in base)
        o, final = run(form, q, k, v, lg, s0, reset, chunk_size)
        ((o * w_o).sum() + (final * w_s).sum()).backward()
        grads = [t.grad for t in (q, k, v, s0) if t is not None]
        return o.detach(), final.detach(), grads

    ref_o, ref_s, ref_g = outputs_and_grads("parallel", None)
    for form, c in FORMS:
        o, s, g = outputs_and_grads(form, c)
        assert err(o, ref_o) <= TOL, (form, c)
        assert err(s, ref_s) <= TOL, (form, c)
        for a, b in zip(g, ref_g, strict=True):
            assert err(a, b) <= TOL, (form, c)
    # the resets matter: without them the outputs differ
    q, k, v, lg, s0, _ = base
    assert err(parallel_retention(q, k, v, lg, s0)[0], ref_o) > 1e-3


def test_decoding_steps_with_resets_equal_recurrent_form():
    q, k, v, lg, s0, reset = inputs(2)
    ref_o, ref_s = recurrent_retention(q, k, v, lg, s0, reset)
    state, outs = s0, []
    for t in range(T):
        o, state = retention_step(q[:, t], k[:, t], v[:, t], lg, state, reset[:, t])
        outs.append(o)
    assert err(torch.stack(outs, 1), ref_o) <= TOL and err(state, ref_s) <= TOL


def test_no_reset_flags_equal_the_no_reset_path():
    q, k, v, lg, s0, _ = inputs(3)
    none = torch.zeros(B, T, dtype=torch.bool)
    for form, c in [("parallel", None), *FORMS]:
        a = run(form, q, k, v, lg, s0, None, c)
        b = run(form, q, k, v, lg, s0, none, c)
        assert err(a[0], b[0]) <= 1e-12 and err(a[1], b[1]) <= 1e-12, (form, c)


@pytest.mark.parametrize("form,chunk_size", [("parallel", None), ("chunk", 8), ("recurrent", None)])
def test_packed_sample_equals_documents_run_separately(form, chunk_size):
    q, k, v, lg, s0, reset = inputs(4)
    o, final = run(form, q, k, v, lg, s0, reset, chunk_size)
    for b in range(B):
        starts = [0, *[t for t in range(1, T) if reset[b, t]], T]
        for i, (a, e) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            # the first document continues the initial state unless the sample resets at t = 0
            init = s0[b:b + 1] if i == 0 and not reset[b, 0] else None
            od, sd = parallel_retention(q[b:b + 1, a:e], k[b:b + 1, a:e], v[b:b + 1, a:e], lg, init)
            assert err(o[b:b + 1, a:e], od) <= TOL, (b, a, e)
        assert err(final[b:b + 1], sd) <= TOL, b  # the final state is the last document's


def test_reset_argument_is_validated():
    q, k, v, lg, s0, reset = inputs(5)
    with pytest.raises(ValueError, match=r"reset has shape \(3, 36\)"):
        parallel_retention(q, k, v, lg, s0, reset[:, 1:])
    with pytest.raises(ValueError, match="reset has dtype"):
        chunk_retention(q, k, v, lg, s0, chunk_size=8, reset=reset.long())
    with pytest.raises(ValueError, match=r"expected \(B,\)"):
        retention_step(q[:, 0], k[:, 0], v[:, 0], lg, s0, reset)


# ------------------------------------------------------------------------------------------
# the RetNet model (rotary, every layer, logits and loss)


def retnet(ctx, mode: str) -> RetNet:
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=96", f"model.retention_mode={mode}",
                                            "model.chunk_size=8"])
    torch.manual_seed(5)
    return RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).double().eval()


@pytest.mark.parametrize("mode", ["chunk", "parallel", "recurrent"])
def test_retnet_packed_sample_equals_documents_separately(ctx1, mode):
    """Rotary positions keep running through a packed sample (doc 2 starts at position 13, its
    separate run at 0): the logits agree anyway, so restarting them would change nothing."""
    model = retnet(ctx1, mode)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(96, (n,), generator=g) for n in (13, 3, 16, 8)]  # 13 + 3 ends on chunk 16
    tokens = torch.cat(docs)[None]  # (1, 40)
    doc_start = torch.zeros(1, tokens.shape[1], dtype=torch.bool)
    offsets = torch.tensor([0, 13, 16, 32])
    doc_start[0, offsets] = True
    with torch.no_grad():
        packed = model(tokens, tokens, doc_start=doc_start)
        mixed = model(tokens, tokens)
        for d, a in zip(docs, offsets.tolist(), strict=True):
            alone = model(d[None], d[None])
            e = a + d.numel()
            assert err(packed.logits[:, a:e], alone.logits) <= 1e-10, a
            assert err(packed.loss[:, a:e], alone.loss) <= 1e-10, a
        # the final state is the last document's own (in the rotary frame of its absolute
        # positions, which RetNetState.position carries): continuing it gives the same logits
        more = torch.randint(96, (1, 5), generator=g)
        cont_packed = model(more, state=packed.state)
        cont_alone = model(more, state=alone.state)
        assert err(cont_packed.logits, cont_alone.logits) <= 1e-10
        assert err(mixed.logits[:, 13:], packed.logits[:, 13:]) > 1e-3  # without resets docs mix


def test_retnet_rotary_offset_is_irrelevant_inside_a_document(ctx1):
    """A document computed at absolute positions p.. (zero state) equals the same document at 0."""
    from megaret.models.retnet import RetNetState

    model = retnet(ctx1, "chunk")
    x = torch.randint(96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        at0 = model(x, x)
        for p in (7, 16, 1000):
            zero = model.init_state(2, torch.float64)
            at_p = model(x, x, state=RetNetState(zero.layers, p))
            assert err(at_p.logits, at0.logits) <= 1e-10, p
