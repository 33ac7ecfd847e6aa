"""Launched by tests/test_fla_kernels.py: megaret's fla chunk form equals the torch chunk form.

Runs in a process of its own: without CUDA the Triton interpreter is installed before anything
imports triton (tests/kernels_adapters.py); with CUDA the real compiled kernels run. fp32,
tiny shapes. For each check, the output, final state and the gradients of q, k, v and the
initial state are compared (max |a - b| / max |b|) with megaret.ops.chunk_retention; a negative
control runs fla's own chunk_retention (local-head decays) on TP-rank decays. Prints one line
`RESULT {json}`.
"""

from __future__ import annotations

import json
import time

from tests.kernels_adapters import install, interpreted

INTERPRETED = interpreted() and install()  # before triton is imported

import torch  # noqa: E402

from megaret.ops import chunk_retention, retnet_log_decay  # noqa: E402
from megaret.ops.retention_fla import chunk_retention_fla  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
B, T, H, DK, DV = 2, 100, 2, 16, 32  # T not a multiple of fla's chunk (64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, H, DK, generator=g), "k": torch.randn(B, T, H, DK, generator=g) * DK**-0.5,
         "v": torch.randn(B, T, H, DV, generator=g), "s0": torch.randn(B, H, DK, DV, generator=g) * 0.5,
         "wo": torch.randn(B, T, H, DV, generator=g), "ws": torch.randn(B, H, DK, DV, generator=g)}
    return {n: t.to(DEVICE) for n, t in x.items()}


def run(form, x: dict, log_decay: torch.Tensor, state: bool, reset: torch.Tensor | None) -> dict:
    """Output, final state and the gradients of a random linear loss on both."""
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "s0")}
    o, s = form(leaves["q"], leaves["k"], leaves["v"], log_decay, leaves["s0"] if state else None,
                reset=reset)
    ((o * x["wo"]).sum() + (s * x["ws"]).sum()).backward()
    out = {"o": o.detach(), "state": s.detach()}
    out.update({f"d{n}": t.grad for n, t in leaves.items() if t.grad is not None})
    return out


def resets() -> torch.Tensor:
    r = torch.zeros(B, T, dtype=torch.bool)
    r[0, [5, 6, 40, 99]] = True  # a one-token document, a long one, a reset at the last token
    r[1, [0, 70]] = True  # sample 1 drops its carried state at once
    return r.to(DEVICE)


def main() -> None:
    rank1_of_2 = retnet_log_decay(2 * H, head_offset=H, num_local_heads=H)  # global heads 2, 3
    rank3_of_4 = retnet_log_decay(4 * H, head_offset=3 * H, num_local_heads=H)  # global heads 6, 7
    checks = {
        "tp1of2/state": (rank1_of_2, True, None),
        "tp3of4/state": (rank3_of_4, True, None),
        "tp3of4/state/resets": (rank3_of_4, True, resets()),
        "tp1of2/resets": (rank1_of_2, False, resets()),
    }
    report: dict = {"interpreted": INTERPRETED, "device": DEVICE.type}
    for i, (name, (lg, state, reset)) in enumerate(checks.items()):
        x, lg = inputs(i), lg.to(DEVICE)
        t0 = time.perf_counter()
        got = run(chunk_retention_fla, x, lg, state, reset)
        seconds = time.perf_counter() - t0
        ref = run(lambda *a, **kw: chunk_retention(*a, **kw, chunk_size=16), x, lg, state, reset)
        assert got.keys() == ref.keys(), (got.keys(), ref.keys())
        report[name] = {key: rel(got[key], ref[key]) for key in ref} | {"fla_s": round(seconds, 2)}

    # Negative control: fla's chunk_retention builds its decays from the LOCAL head count.
    from fla.ops.retention import chunk_retention as fla_local_decays

    x = inputs(9)
    ref, _ = chunk_retention(x["q"], x["k"], x["v"], rank1_of_2.to(DEVICE), x["s0"])
    o, _ = fla_local_decays(x["q"], x["k"], x["v"], scale=1.0, initial_state=x["s0"], output_final_state=True)
    report["control/fla_chunk_retention_tp1of2"] = {"o": rel(o, ref)}
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
