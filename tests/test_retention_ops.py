"""Tests for megaret.ops: the retention forms agree with each other and with the definition, states
hand over exactly, long bf16 sequences stay finite and accurate, bad inputs are rejected."""

from __future__ import annotations

import math

import pytest
import torch

from megaret.ops import (
    check_log_decay,
    chunk_retention,
    parallel_retention,
    recurrent_retention,
    retention_step,
    retnet_log_decay,
)

B, T, H, DK, DV = 2, 37, 4, 8, 6
TOL = 1e-10
FORMS = {
    "parallel": parallel_retention,
    "recurrent": recurrent_retention,
    "chunk8": lambda *a: chunk_retention(*a, chunk_size=8),
}


def _inputs(seed: int = 0, t: int = T, with_state: bool = True, dtype=torch.float64):
    """N(0,1) inputs scaled so that q.k ~ N(0,1) and o is O(1) over a length-t sequence."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, H, DK, generator=g, dtype=dtype) * DK**-0.25
    k = torch.randn(B, t, H, DK, generator=g, dtype=dtype) * DK**-0.25
    v = torch.randn(B, t, H, DV, generator=g, dtype=dtype) * t**-0.5
    s0 = torch.randn(B, H, DK, DV, generator=g, dtype=dtype) * DK**-0.5 if with_state else None
    return q, k, v, s0


def _log_decay(dtype=torch.float64):
    # retnet schedule, H=4: gamma = 1 - 1/32 ... 1 - 1/256 (very different memories)
    return retnet_log_decay(H).to(dtype)


def _naive(q, k, v, log_decay, s0):
    """The definition, term by term: o_t = sum_{s<=t} g^(t-s)(q_t.k_s)v_s + g^(t+1) q_t S_0."""
    b, t_len, h, _ = q.shape
    o = torch.zeros(b, t_len, h, v.shape[-1], dtype=q.dtype)
    gam = torch.exp(log_decay)
    for t in range(t_len):
        for s in range(t + 1):
            w = gam ** (t - s) * (q[:, t] * k[:, s]).sum(-1)  # (B, H)
            o[:, t] += w[..., None] * v[:, s]
        if s0 is not None:
            o[:, t] += gam[None, :, None] ** (t + 1) * torch.einsum("bhd,bhde->bhe", q[:, t], s0)
    final = torch.zeros(b, h, q.shape[-1], v.shape[-1], dtype=q.dtype)
    for s in range(t_len):
        final += gam[None, :, None, None] ** (t_len - 1 - s) * k[:, s, :, :, None] * v[:, s, :, None, :]
    if s0 is not None:
        final += gam[None, :, None, None] ** t_len * s0
    return o, final


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run_with_grads(fn, q, k, v, lg, s0, wo, wf):
    """Forward + backward of a random weighted sum of o and the final state; returns o, S, grads."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    st = s0.detach().clone().requires_grad_(True) if s0 is not None else None
    o, final = fn(*leaves, lg, st)
    ((o * wo).sum() + (final * wf).sum()).backward()
    grads = [x.grad for x in leaves] + ([st.grad] if st is not None else [])
    return o.detach(), final.detach(), grads


# --------------------------------------------------------------------------------------------------
# parity in fp64
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_matches_definition(with_state):
    q, k, v, s0 = _inputs(1, t=13, with_state=with_state)
    lg = _log_decay()
    o_ref, f_ref = _naive(q, k, v, lg, s0)
    o, f = parallel_retention(q, k, v, lg, s0)
    assert _maxdiff(o, o_ref) <= TOL
    assert _maxdiff(f, f_ref) <= TOL
    assert o.abs().max() > 0.1  # the comparison is not vacuous


@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree_forward_and_backward(with_state):
    q, k, v, s0 = _inputs(2, with_state=with_state)
    lg = _log_decay()
    g = torch.Generator().manual_seed(3)
    wo = torch.randn(B, T, H, DV, generator=g, dtype=torch.float64)
    wf = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64)
    ref_o, ref_f, ref_g = _run_with_grads(parallel_retention, q, k, v, lg, s0, wo, wf)
    assert ref_o.abs().max() > 0.1 and ref_f.abs().max() > 0.1
    assert len(ref_g) == (4 if with_state else 3)
    for name, fn in FORMS.items():
        o, f, grads = _run_with_grads(fn, q, k, v, lg, s0, wo, wf)
        assert o.shape == (B, T, H, DV) and f.shape == (B, H, DK, DV)
        assert _maxdiff(o, ref_o) <= TOL, name
        assert _maxdiff(f, ref_f) <= TOL, name
        names = ["q", "k", "v", "initial_state"][: len(ref_g)]
        for gname, ga, gb in zip(names, grads, ref_g, strict=True):
            assert ga is not None, (name, gname)
            assert _maxdiff(ga, gb) <= TOL, (name, gname)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_chunk_size_does_not_change_result(chunk_size):
    q, k, v, s0 = _inputs(4)
    lg = _log_decay()
    o_ref, f_ref = parallel_retention(q, k, v, lg, s0)
    o, f = chunk_retention(q, k, v, lg, s0, chunk_size=chunk_size)
    assert _maxdiff(o, o_ref) <= TOL
    assert _maxdiff(f, f_ref) <= TOL


@pytest.mark.parametrize("form", list(FORMS))
def test_state_handover_equals_one_call(form):
    fn = FORMS[form]
    q, k, v, s0 = _inputs(5)
    lg = _log_decay()
    o_full, f_full = fn(q, k, v, lg, s0)
    split = 20  # ragged for chunk 8 in both halves
    o1, f1 = fn(q[:, :split], k[:, :split], v[:, :split], lg, s0)
    o2, f2 = fn(q[:, split:], k[:, split:], v[:, split:], lg, f1)
    assert _maxdiff(torch.cat([o1, o2], dim=1), o_full) <= TOL
    assert _maxdiff(f2, f_full) <= TOL


@pytest.mark.parametrize("with_state", [False, True])
def test_step_loop_equals_recurrent(with_state):
    q, k, v, s0 = _inputs(6, with_state=with_state)
    lg = _log_decay()
    o_ref, f_ref = recurrent_retention(q, k, v, lg, s0)
    state, outs = s0, []
    for t in range(T):
        o_t, state = retention_step(q[:, t], k[:, t], v[:, t], lg, state)
        assert o_t.shape == (B, H, DV) and state.shape == (B, H, DK, DV)
        outs.append(o_t)
    assert _maxdiff(torch.stack(outs, dim=1), o_ref) <= TOL
    assert _maxdiff(state, f_ref) <= TOL


def test_low_precision_dtypes():
    """bf16 in -> bf16 out, fp32 final state; a bf16 state from a previous call is accepted."""
    q, k, v, s0 = _inputs(7, dtype=torch.float32)
    lg = _log_decay(torch.float32)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    for name, fn in FORMS.items():
        o, f = fn(qb, kb, vb, lg, s0.bfloat16())
        assert o.dtype == torch.bfloat16, name
        assert f.dtype == torch.float32, name
    o, f = retention_step(qb[:, 0], kb[:, 0], vb[:, 0], lg, None)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# long bf16 sequence
# --------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_long_sequence_chunk():
    b, t_len, h, d, c = 1, 16384, 2, 16, 128
    # fastest and slowest decay: gamma = 1 - 2^-5 and 1 - 2^-16 (retnet heads 0 and 11 of 12)
    lg = retnet_log_decay(12)[[0, 11]]
    assert torch.allclose(torch.exp(lg.double()), torch.tensor([1 - 2**-5, 1 - 2**-16], dtype=torch.float64))
    g = torch.Generator().manual_seed(8)
    q = (torch.randn(b, t_len, h, d, generator=g) * d**-0.25).bfloat16()
    k = (torch.randn(b, t_len, h, d, generator=g) * d**-0.25).bfloat16()
    v = (torch.randn(b, t_len, h, d, generator=g) * 0.05).bfloat16()
    s0 = torch.randn(b, h, d, d, generator=g) * 4.0
    wo = torch.randn(b, t_len, h, d, generator=g)
    wf = torch.randn(b, h, d, d, generator=g) * 0.01

    def run(dtype, ld):
        qq, kk, vv = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
        ss = s0.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
        o, f = chunk_retention(qq, kk, vv, ld, ss, chunk_size=c)
        ((o.to(wo.dtype) * wo).sum() + (f.to(wf.dtype) * wf).sum()).backward()
        return o.detach(), f.detach(), qq.grad, ss.grad

    o16, f16, gq16, gs16 = run(torch.bfloat16, lg)
    o64, f64, gq64, gs64 = run(torch.float64, lg.double())  # same (bf16-rounded) inputs
    assert o16.dtype == torch.bfloat16 and f16.dtype == torch.float32
    for x in (o16, f16, gq16, gs16):
        assert torch.isfinite(x).all()
    # the slow head still sees the initial state at the end (gamma^T ~ 0.78): its grad is not tiny
    assert gs64[0, 1].abs().max() > 1e-2 and o64[0, -1, 1].abs().max() > 1e-3
    assert _rel(o16, o64) <= 2e-2
    assert _rel(f16, f64) <= 2e-2
    assert _rel(gq16, gq64) <= 2e-2
    assert _rel(gs16, gs64) <= 2e-2


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


ALL_FORMS = [parallel_retention, recurrent_retention, chunk_retention]


@pytest.mark.parametrize("fn", ALL_FORMS)
def test_validation_errors(fn):
    q, k, v, s0 = _inputs(9, t=7, dtype=torch.float32)
    lg = _log_decay(torch.float32)
    with pytest.raises(ValueError, match=r"^k has shape \(2, 5, 4, 8\); expected .*\(2, 7, 4, 8\)"):
        fn(q, k[:, :5], v, lg)
    with pytest.raises(ValueError, match=r"^q has shape"):
        fn(q[0], k, v, lg)
    with pytest.raises(ValueError, match=r"^v has shape"):
        fn(q, k, v[:, :, :2], lg)
    with pytest.raises(ValueError, match=r"^q has dtype"):
        fn(q.long(), k.long(), v.long(), lg)
    with pytest.raises(ValueError, match=r"^k has dtype"):
        fn(q, k.double(), v, lg)
    with pytest.raises(ValueError, match=r"^log_decay has dtype"):
        fn(q, k, v, torch.full((H,), -1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^log_decay has shape"):
        fn(q, k, v, lg[:2])
    with pytest.raises(ValueError, match=r"^initial_state has shape"):
        fn(q, k, v, lg, s0[:, :, :, :3])


def test_decays_checked_where_built_not_per_call():
    """The decay check runs when the decays are built (a host sync on GPU), not in every forward."""
    lg = _log_decay(torch.float32)
    for bad in (-lg, torch.full((H,), float("-inf")), torch.zeros(H)):
        with pytest.raises(ValueError, match=r"^log_decay must be finite and < 0"):
            check_log_decay(bad)
    with pytest.raises(ValueError, match=r"^log_decay must be finite and < 0"):
        retnet_log_decay(160)  # 1 - 2^-164 rounds to 1 in fp32: gamma = 1 never forgets
    q, k, v, _ = _inputs(9, t=7, dtype=torch.float32)
    chunk_retention(q, k, v, -lg)  # the caller's promise: no check (no sync) per call


def test_validation_chunk_size_and_step():
    q, k, v, s0 = _inputs(10, t=7, dtype=torch.float32)
    lg = _log_decay(torch.float32)
    with pytest.raises(ValueError, match=r"^chunk_size"):
        chunk_retention(q, k, v, lg, chunk_size=0)
    with pytest.raises(ValueError, match=r"^q has shape"):
        retention_step(q, k, v, lg)  # 4-D q for the single-token step
    with pytest.raises(ValueError, match=r"^state has shape"):
        retention_step(q[:, 0], k[:, 0], v[:, 0], lg, s0[:1])


# --------------------------------------------------------------------------------------------------
# decay schedules
# --------------------------------------------------------------------------------------------------


def test_retnet_schedule_values():
    lg = retnet_log_decay(12)
    assert lg.dtype == torch.float32 and lg.shape == (12,)
    expected = torch.tensor([math.log1p(-(2.0 ** (-5 - h))) for h in range(12)], dtype=torch.float64)
    assert torch.allclose(lg.double(), expected, rtol=1e-6, atol=0)
    assert (lg < 0).all() and (lg[1:] > lg[:-1]).all()  # strictly slower decay for later heads


def test_loglinear_schedule_values():
    lg = retnet_log_decay(8, schedule="loglinear").double()
    one_minus = -torch.expm1(lg)  # 1 - gamma
    assert torch.allclose(one_minus[0], torch.tensor(1 / 32, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(one_minus[-1], torch.tensor(1 / 512, dtype=torch.float64), rtol=1e-6)
    steps = torch.log(one_minus).diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)  # log-linear spacing


@pytest.mark.parametrize("schedule", ["retnet", "loglinear"])
@pytest.mark.parametrize(("offset", "local"), [(0, 4), (4, 4), (8, 4), (3, 5), (11, 1), (5, None)])
def test_schedule_slice_equals_global_slice(schedule, offset, local):
    full = retnet_log_decay(12, schedule=schedule)
    part = retnet_log_decay(12, head_offset=offset, num_local_heads=local, schedule=schedule)
    end = 12 if local is None else offset + local
    assert torch.equal(part, full[offset:end])


def test_schedule_errors():
    with pytest.raises(ValueError, match="retnet.*loglinear"):
        retnet_log_decay(4, schedule="alibi")
    with pytest.raises(ValueError):
        retnet_log_decay(4, head_offset=2, num_local_heads=3)
    with pytest.raises(ValueError):
        retnet_log_decay(0)
