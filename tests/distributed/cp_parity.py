"""Launched by tests/test_context_parallel.py on CPU ranks: RetNet under context parallelism equals
one process (logits, per-token loss and every parameter gradient).

Arguments: [--fla] and layouts "cp,tp" (the world size must be a multiple of cp * tp).

For each layout and each case (plain; document starts inside slices and on a slice boundary;
a carried state with document starts) the same seed builds the same model; each CP rank runs
its contiguous slice of the batch; logits and losses are gathered along T over CP, gradients
summed over CP (as the trainer reduces them over DP x CP) and gathered over TP, then compared
with a one-process run. With --fla the layouts run model.retention_kernel=fla (Triton's
interpreter, tests/kernels_adapters.py) against the torch one-process reference. Rank 0 prints
one line `RESULT {json}`.
"""

from __future__ import annotations

import sys

FLA = "--fla" in sys.argv
if FLA:
    from tests.kernels_adapters import install

    install()  # CPU ranks: the interpreter, whatever devices the machine has

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import print_result, rel  # noqa: E402  (tests/distributed/_common.py, the script's folder)

from megaret.checkpoint.gather import gather_full  # noqa: E402
from megaret.config import load_config  # noqa: E402
from megaret.models.retnet import RetNet, RetNetState  # noqa: E402
from megaret.parallel.context import build_parallel_context, destroy_parallel_context  # noqa: E402
from megaret.parallel.megatron_config import megatron_config  # noqa: E402

B, T, V, HEADS = 2, 32, 128, 4


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[0, [5, 20]] = doc_start[1, [0, 16, 27]] = True  # 16: a slice boundary at CP=2 and CP=4
    return {"x": torch.randint(V, (B, T), generator=gen), "y": torch.randint(V, (B, T), generator=gen),
            "w": torch.rand(B, T, generator=gen), "doc_start": doc_start}


def carried(model: RetNet, tp: int, rank: int) -> RetNetState:
    """A random carried state, this rank's heads of one full (B, H, Dk, Dv) state per layer."""
    gen = torch.Generator().manual_seed(7)
    layers = []
    for layer in model.layers:
        m = layer.retention
        full = torch.randn(B, m.local_heads * tp, m.key_dim, m.value_dim, generator=gen) * 0.3
        layers.append(full[:, rank * m.local_heads : (rank + 1) * m.local_heads])
    return RetNetState(layers, 40)


def gather_cp(t: torch.Tensor, ctx, dim: int) -> torch.Tensor:
    pieces = [torch.empty_like(t) for _ in range(ctx.cp.size)]
    dist.all_gather(pieces, t.contiguous(), group=ctx.cp.group)
    return torch.cat(pieces, dim)


def run(cp: int, tp: int, case: str, kernel: str = "torch", mode: str = "chunk"):
    overrides = [f"parallel.tensor={tp}", f"model.num_heads={HEADS}", f"model.vocab_size={V}",
                 "model.chunk_size=4", f"model.retention_kernel={kernel}"]
    cfg = load_config("configs/tiny.yaml", overrides)
    ctx = build_parallel_context(tp, 1, seed=cfg.train.seed, context_parallel=cp)
    torch.manual_seed(11)
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp, cp=ctx.cp)
    data = batch()
    lo, hi = ctx.cp.rank * T // cp, (ctx.cp.rank + 1) * T // cp  # this rank's slice
    kw = {}
    if case != "plain":
        kw["doc_start"] = data["doc_start"][:, lo:hi]
    if case == "state":
        kw["state"] = carried(model, tp, ctx.tp.rank)
    out = model(data["x"][:, lo:hi], data["y"][:, lo:hi], retention_mode=mode, **kw)
    (out.loss * data["w"][:, lo:hi]).sum().backward()
    for p in model.parameters():  # CP peers' gradients are summed (the trainer: over DP x CP)
        dist.all_reduce(p.grad, group=ctx.cp.group)
    logits = gather_cp(model.gather_logits(out.logits).detach(), ctx, 1)  # (B, T, V)
    loss = gather_cp(out.loss.detach(), ctx, 1)  # (B, T)
    state = torch.cat([s for s in out.state.layers])  # the sequence's final state, every CP rank
    if tp > 1:
        pieces = [torch.empty_like(state) for _ in range(tp)]
        dist.all_gather(pieces, state.detach().contiguous(), group=ctx.tp.group)
        state = torch.cat(pieces, 1)
    return {"logits": logits, "loss": loss, "grads": gather_full([model], ctx, lambda p: p.grad),
            "state": state.detach(), "position": out.state.position}


def main() -> None:
    layouts = [tuple(map(int, a.split(","))) for a in sys.argv[1:] if a != "--fla"]
    results = {}
    cases = ("plain", "resets", "state")
    refs = {c: run(1, 1, c) for c in cases}
    for cp, tp in layouts:
        for case in cases:
            got, ref = run(cp, tp, case, "fla" if FLA else "torch"), refs[case]
            assert got["grads"].keys() == ref["grads"].keys()
            results[f"{'fla/' if FLA else ''}cp{cp}tp{tp}/{case}"] = {
                "logits_rel": rel(got["logits"], ref["logits"]),
                "loss_rel": rel(got["loss"], ref["loss"]),
                "grad_rel_max": max(rel(got["grads"][n], ref["grads"][n]) for n in ref["grads"]),
                "state_rel": rel(got["state"], ref["state"]),
                "position_ok": got["position"] == ref["position"],
            }
    if not FLA:  # the parallel form on the slices too
        ref, got = run(1, 1, "resets", mode="parallel"), run(layouts[0][0], 1, "resets", mode="parallel")
        results[f"parallel/cp{layouts[0][0]}"] = {
            "logits_rel": rel(got["logits"], ref["logits"]), "loss_rel": rel(got["loss"], ref["loss"]),
            "grad_rel_max": max(rel(got["grads"][n], ref["grads"][n]) for n in ref["grads"]),
            "state_rel": rel(got["state"], ref["state"]), "position_ok": True}
    print_result(results)
    destroy_parallel_context()


if __name__ == "__main__":
    sys.exit(main())
