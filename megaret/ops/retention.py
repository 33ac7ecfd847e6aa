"""Multi-scale retention (RetNet, arXiv 2307.08621) in pure PyTorch.

For every head h with decay gamma = exp(log_decay[h]) in (0, 1) all forms compute

    o_t = sum_{s <= t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0
    S_T = gamma^T S_0 + sum_{s < T} gamma^(T-1-s) k_s^T v_s

where S_0 is an optional initial state ``(Dk, Dv)`` per head and S_T the returned final state, so a
second call with ``initial_state=S_T`` continues the sequence exactly. There is no score
normalisation and no key scaling in here: the caller scales keys, and the layer's per-head
GroupNorm makes the overall scale irrelevant.

Document resets (packed samples): every form takes an optional ``reset`` ``(B, T)`` bool (the
step ``(B,)``), True where a new document starts. The state is zeroed just before such a
position, so o_t sees only s in [last reset <= t, t], the initial state reaches only the
positions before the first reset, and the final state holds only the keys after the last reset
(plus S_0 when there is no reset at all). ``reset=None`` is the unchanged no-reset path.

Contract (shared with flash-linear-attention style ops):
  q, k: ``(B, T, H, Dk)``; v: ``(B, T, H, Dv)``; log_decay: ``(H,)`` with log_decay < 0, finite
  (the forms do not check it: :func:`check_log_decay` does, where the decays are built);
  initial_state: ``(B, H, Dk, Dv)`` or None. Every form returns ``(o, final_state)`` with o
  ``(B, T, H, Dv)`` in the dtype of q and final_state ``(B, H, Dk, Dv)``.

Precision: fp64 inputs are computed in fp64, everything else (fp32, bf16, fp16) in fp32. The
output is cast back to the input dtype; the final state is returned in the compute dtype, i.e.
**fp32 for bf16/fp16 inputs**, because the state is carried across calls (decoding, truncated
BPTT) and would lose its slow-decay memory if rounded to bf16 every time. Any floating
initial_state dtype is accepted and cast to the compute dtype.

Overflow: every decay factor used anywhere below is gamma^e with an exponent e >= 0, so it lies
in (0, 1] and can only underflow to 0 (which is the correct limit), never overflow, at any T,
in fp32 or bf16. In particular nothing is ever divided by a decay (no gamma^-t rescaling tricks).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_log_decay", "chunk_retention", "parallel_retention", "recurrent_retention", "retention_step",
]


# --------------------------------------------------------------------------------------------------
# validation / dtype helpers
# --------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    state: Tensor | None,
    *,
    step: bool = False,
    state_name: str = "initial_state",
    chunk_size: int | None = None,
) -> None:
    """Check shapes, dtypes and devices of the retention inputs; raise ValueError naming the tensor.

    ``step=True`` checks the single-token layout (no T axis) used by :func:`retention_step`.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if step:
        qk_layout, v_layout, rank = "(B, H, Dk)", "(B, H, Dv)", 3
    else:
        qk_layout, v_layout, rank = "(B, T, H, Dk)", "(B, T, H, Dv)", 4
    if q.dim() != rank:
        raise ValueError(f"q has shape {_shape(q)}; expected {rank}-D {qk_layout}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q has dtype {q.dtype}; expected a floating dtype")
    if k.dim() != rank or k.shape != q.shape:
        raise ValueError(f"k has shape {_shape(k)}; expected {qk_layout} = {_shape(q)} matching q")
    lead = tuple(q.shape[:-1])
    if v.dim() != rank or tuple(v.shape[:-1]) != lead:
        want = "(" + ", ".join(str(s) for s in lead) + ", Dv)"
        raise ValueError(f"v has shape {_shape(v)}; expected {v_layout} = {want} matching q")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected {q.dtype} matching q")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device}; expected {q.device} matching q")
    B, H, Dk, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    if log_decay.shape != (H,):
        raise ValueError(f"log_decay has shape {_shape(log_decay)}; expected (H,) = ({H},)")
    if not log_decay.dtype.is_floating_point:
        raise ValueError(f"log_decay has dtype {log_decay.dtype}; expected a floating dtype")
    if log_decay.device != q.device:
        raise ValueError(f"log_decay is on device {log_decay.device}; expected {q.device} matching q")
    if state is not None:
        if not isinstance(state, Tensor):
            raise ValueError(f"{state_name} must be a torch.Tensor or None, got {type(state).__name__}")
        if state.shape != (B, H, Dk, Dv):
            raise ValueError(
                f"{state_name} has shape {_shape(state)}; expected (B, H, Dk, Dv) = ({B}, {H}, {Dk}, {Dv})"
            )
        if not state.dtype.is_floating_point:
            raise ValueError(f"{state_name} has dtype {state.dtype}; expected a floating dtype")
        if state.device != q.device:
            raise ValueError(f"{state_name} is on device {state.device}; expected {q.device} matching q")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def check_log_decay(log_decay: Tensor) -> None:
    """gamma = exp(log_decay) must be in (0, 1): log_decay < 0 and finite; ValueError otherwise.

    Checked where the decays are built (megaret/ops/decay.py), not in the forms: on a GPU the
    check is a host sync, which the forward of every layer would pay again on every call.
    """
    if not bool(((log_decay < 0) & torch.isfinite(log_decay)).all()):
        raise ValueError(f"log_decay must be finite and < 0 (gamma in (0, 1)); got {log_decay.tolist()}")


def _validate_reset(reset: Tensor | None, q: Tensor, *, step: bool = False) -> None:
    if reset is None:
        return
    want = tuple(q.shape[:1]) if step else tuple(q.shape[:2])
    name = "(B,)" if step else "(B, T)"
    if not isinstance(reset, Tensor) or tuple(reset.shape) != want:
        got = _shape(reset) if isinstance(reset, Tensor) else type(reset).__name__
        raise ValueError(f"reset has shape {got}; expected {name} = {want} matching q")
    if reset.dtype != torch.bool:
        raise ValueError(f"reset has dtype {reset.dtype}; expected torch.bool")
    if reset.device != q.device:
        raise ValueError(f"reset is on device {reset.device}; expected {q.device} matching q")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32/bf16/fp16 are computed (and carry state) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _decay_matrix(log_decay: Tensor, n: int) -> Tensor:
    """D[h, i, j] = gamma_h^(i-j) for i >= j else 0, shape (H, n, n).

    The exponent (i-j)*log_gamma is masked to -inf *before* exp, so exp only ever sees
    non-positive numbers (no overflow, and no inf*0 NaNs in the backward).
    """
    idx = torch.arange(n, device=log_decay.device)
    diff = (idx[:, None] - idx[None, :]).to(log_decay.dtype)  # (n, n)
    expo = diff[None] * log_decay[:, None, None]  # (H, n, n)
    expo = torch.where(diff[None] >= 0, expo, torch.full_like(expo, float("-inf")))
    return torch.exp(expo)


# --------------------------------------------------------------------------------------------------
# forms
# --------------------------------------------------------------------------------------------------


def parallel_retention(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Parallel (training) form: ``o = (Q K^T ⊙ D) V + (Q S_0) ⊙ xi``. O(T^2) time and memory.

    Simplest and most obviously correct form; the reference the other forms are tested against.
    With ``reset`` (B, T), D[n, m] is kept only within a document (doc_id[n] == doc_id[m],
    doc_id the running count of resets).
    """
    _validate(q, k, v, log_decay, initial_state)
    _validate_reset(reset, q)
    out_dtype, cdt = q.dtype, _compute_dtype(q.dtype)
    T = q.shape[1]
    qh = q.transpose(1, 2).to(cdt)  # (B, H, T, Dk)
    kh = k.transpose(1, 2).to(cdt)  # (B, H, T, Dk)
    vh = v.transpose(1, 2).to(cdt)  # (B, H, T, Dv)
    lg = log_decay.to(cdt)  # (H,)

    D = _decay_matrix(lg, T)  # (H, T, T)
    if reset is not None:
        doc = reset.long().cumsum(1)  # (B, T): document index of every position
        same = (doc[:, :, None] == doc[:, None, :]).to(cdt)  # (B, T, T)
        D = D[None] * same[:, None]  # (B, H, T, T)
    scores = torch.einsum("bhtd,bhsd->bhts", qh, kh) * D  # (B, H, T, T)
    o = torch.einsum("bhts,bhse->bhte", scores, vh)  # (B, H, T, Dv)

    pos = torch.arange(T, device=q.device, dtype=cdt)  # (T,)
    # Final-state weights gamma^(T-1-s), exponent >= 0.
    zeta = torch.exp((T - 1 - pos)[None, :] * lg[:, None])  # (H, T)
    if reset is None:
        final = torch.einsum("bhsd,bhse->bhde", kh, vh * zeta[None, :, :, None])  # (B, H, Dk, Dv)
    else:  # only the keys of the last document reach the final state
        last = (doc == doc[:, -1:]).to(cdt) if T else doc.to(cdt)  # (B, T)
        final = torch.einsum("bhsd,bhse->bhde", kh, vh * (zeta[None] * last[:, None])[..., None])
    if initial_state is not None:
        s0 = initial_state.to(cdt)  # (B, H, Dk, Dv)
        xi = torch.exp((pos + 1)[None, :] * lg[:, None])[None, :, :, None]  # (1, H, T, 1): gamma^(t+1)
        s0_final = torch.exp(T * lg)[None, :, None, None] * s0
        if reset is not None:  # S_0 reaches the positions before the first reset only
            xi = xi * (doc == 0).to(cdt)[:, None, :, None]  # (B, H, T, 1)
            s0_final = s0_final * (~reset.any(1)).to(cdt)[:, None, None, None]
        o = o + torch.einsum("bhtd,bhde->bhte", qh, s0) * xi
        final = final + s0_final
    return o.transpose(1, 2).to(out_dtype), final


def recurrent_retention(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Recurrent form, a Python loop over time: ``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``.

    O(T) but slow (T small kernels); useful as a reference and for prefill-free decoding checks.
    With ``reset`` (B, T), S_{n-1} is zeroed where reset[:, n].
    """
    _validate(q, k, v, log_decay, initial_state)
    _validate_reset(reset, q)
    out_dtype, cdt = q.dtype, _compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)  # (B, T, H, D*)
    gamma = torch.exp(log_decay.to(cdt))[None, :, None, None]  # (1, H, 1, 1)
    if initial_state is None:
        S = q.new_zeros((B, H, Dk, Dv), dtype=cdt)
    else:
        S = initial_state.to(cdt)  # (B, H, Dk, Dv)
    outs = []
    keep = None if reset is None else (~reset).to(cdt)[:, :, None, None, None]  # (B, T, 1, 1, 1)
    for t in range(T):
        if keep is not None:
            S = S * keep[:, t]
        S = gamma * S + kc[:, t, :, :, None] * vc[:, t, :, None, :]  # (B, H, Dk, Dv)
        outs.append(torch.einsum("bhd,bhde->bhe", qc[:, t], S))  # (B, H, Dv)
    if outs:
        o = torch.stack(outs, dim=1)  # (B, T, H, Dv)
    else:
        o = q.new_zeros((B, 0, H, Dv), dtype=cdt)
    return o.to(out_dtype), S


def retention_step(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step: ``S' = gamma S + k^T v``, ``o = q S'``.

    q, k: ``(B, H, Dk)``; v: ``(B, H, Dv)``; state ``(B, H, Dk, Dv)`` or None (zeros);
    reset ``(B,)`` bool or None: the samples whose state is zeroed before this token.
    Returns ``(o (B, H, Dv), new_state)``; new_state is fp32 for bf16/fp16 inputs.
    """
    _validate(q, k, v, log_decay, state, step=True, state_name="state")
    _validate_reset(reset, q, step=True)
    out_dtype, cdt = q.dtype, _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    kc, vc = kc[..., :, None], vc[..., None, :]  # (B, H, Dk, 1), (B, H, 1, Dv)
    if state is None:
        new_state = kc * vc  # (B, H, Dk, Dv)
    else:
        # decoding reads and writes the whole state once per token: one new tensor, updated in place
        decay = torch.exp(log_decay.to(cdt))[None, :, None, None]  # (1, H, 1, 1)
        if reset is not None:
            decay = decay * (~reset).to(cdt)[:, None, None, None]  # (B, H, 1, 1)
        new_state = state.to(cdt) * decay
        new_state.addcmul_(kc, vc)
    o = torch.matmul(qc[..., None, :], new_state)[..., 0, :]  # (B, H, Dv)
    return o.to(out_dtype), new_state


def chunk_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: Tensor | None = None,
    *,
    chunk_size: int = 64,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunkwise form: parallel inside chunks of ``chunk_size``, recurrent across chunks.

    O(T C) time; the intra-chunk part is one batched einsum over all chunks, the inter-chunk
    state recurrence ``R_i = K_[i]^T (V_[i] ⊙ zeta) + gamma^C R_{i-1}`` is a short loop over the
    T/C chunks. T need not be a multiple of C: the sequence is zero-padded at the end (padding
    sits after every real token, so causality keeps it out of the real outputs, and its k = v = 0
    adds nothing to the state); the ragged last chunk uses its own length L for zeta and the
    gamma^L factor of the final state.

    With ``reset`` (B, T): the intra-chunk decay is kept within a document only; a query uses the
    carried state only if no reset lies in [chunk start, query]; a chunk passes on only its keys
    after its last reset, and drops the incoming state if it holds a reset.
    """
    _validate(q, k, v, log_decay, initial_state, chunk_size=chunk_size)
    _validate_reset(reset, q)
    out_dtype, cdt = q.dtype, _compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = max(1, min(chunk_size, T))  # a chunk longer than T would only add padding
    N = -(-T // C)  # number of chunks
    L = T - (N - 1) * C  # length of the last (possibly ragged) chunk, 1..C (unused if T == 0)
    pad = N * C - T

    lg = log_decay.to(cdt)  # (H,)

    def to_chunks(x: Tensor) -> Tensor:
        x = x.transpose(1, 2).to(cdt)  # (B, H, T, D)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))  # (B, H, N*C, D)
        return x.reshape(B, H, N, C, x.shape[-1])  # (B, H, N, C, D)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)  # (B, H, N, C, D*)
    if reset is not None:
        r = torch.nn.functional.pad(reset, (0, pad)).view(B, N, C)  # padding never resets
        local = r.long().cumsum(2)  # (B, N, C): resets so far inside the chunk
        same = (local[..., :, None] == local[..., None, :]).to(cdt)  # (B, N, C, C): same document
        no_reset_yet = (local == 0).to(cdt)  # (B, N, C): the carried state still counts here
        tail = (local == local[..., -1:]).to(cdt)  # (B, N, C): keys after the chunk's last reset
        carries = (local[..., -1] == 0).to(cdt)  # (B, N): the chunk lets the incoming state through

    # Intra-chunk: parallel form inside each chunk, all chunks in one batched einsum.
    D = _decay_matrix(lg, C)  # (H, C, C)
    D = D[None, :, None] if reset is None else D[None, :, None] * same[:, None]  # (B|1, H, N, C, C)
    scores = torch.einsum("bhncd,bhnsd->bhncs", qc, kc) * D  # (B, H, N, C, C)
    o = torch.einsum("bhncs,bhnse->bhnce", scores, vc)  # (B, H, N, C, Dv)

    # Per-chunk state contributions K_[i]^T (V_[i] ⊙ zeta_i), zeta_i[j] = gamma^(len_i - 1 - j)
    # where len_i = C except for the last chunk (len = L). Padded rows (j >= L) have k = v = 0, so
    # their exponent is clamped to 0 only to keep it non-negative.
    j = torch.arange(C, device=q.device)  # (C,)
    lens = torch.full((N,), C, device=q.device, dtype=torch.long)  # (N,)
    if N:
        lens[-1] = L
    zeta_exp = (lens[:, None] - 1 - j[None, :]).clamp(min=0).to(cdt)  # (N, C), >= 0
    zeta = torch.exp(zeta_exp[None] * lg[:, None, None])  # (H, N, C)
    zeta = zeta[None] if reset is None else zeta[None] * tail[:, None]  # (B|1, H, N, C)
    kv = torch.einsum("bhncd,bhnce->bhnde", kc, vc * zeta[..., None])  # (B, H, N, Dk, Dv)

    # Inter-chunk recurrence on the carried state (compute dtype, fp32 for low precision).
    # Chunk i enters with S_in_i = R_{i-1} (R_{-1} = S_0); only the final state sees gamma^L.
    decay_C = torch.exp(C * lg)[None, :, None, None]  # (1, H, 1, 1): gamma^C
    decay_L = torch.exp(L * lg)[None, :, None, None]  # (1, H, 1, 1): gamma^L
    has_state = initial_state is not None
    S = initial_state.to(cdt) if has_state else q.new_zeros((B, H, Dk, Dv), dtype=cdt)
    states_in = []
    for i in range(N):
        states_in.append(S)
        decay = decay_L if i == N - 1 else decay_C
        if reset is not None:
            decay = decay * carries[:, i, None, None, None]  # (B, 1, 1, 1)
        S = decay * S + kv[:, :, i]  # (B, H, Dk, Dv)
    final = S

    # Inter-chunk output (Q_[i] S_in_i) ⊙ xi, xi_j = gamma^(j+1). Chunk 0 with no initial state
    # enters with zeros and is skipped.
    first = 0 if has_state else 1
    if N > first:
        s_in = torch.stack(states_in[first:], dim=2)  # (B, H, N-first, Dk, Dv)
        xi = torch.exp((j + 1).to(cdt)[None, :] * lg[:, None])  # (H, C)
        inter = torch.einsum("bhncd,bhnde->bhnce", qc[:, :, first:], s_in) * xi[None, :, None, :, None]
        if reset is not None:
            inter = inter * no_reset_yet[:, None, first:, :, None]
        o = o + inter if not first else torch.cat([o[:, :, :1], o[:, :, 1:] + inter], dim=2)

    o = o.reshape(B, H, N * C, Dv)[:, :, :T]  # (B, H, T, Dv)
    return o.transpose(1, 2).to(out_dtype), final
