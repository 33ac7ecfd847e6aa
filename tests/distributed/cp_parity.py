"""Launched by tests/test_context_parallel.py on CPU ranks: RetNet and the attention archs under
context parallelism equal one process (logits, per-token loss and every parameter gradient).

Arguments: [--fla] [--archs a,b] and layouts "cp,tp" (the world size must be a multiple of cp * tp).

For each arch (default retnet; the Transformer runs Ulysses all-to-all attention, the
sliding-window arch the previous rank's last block as a halo), layout and case (plain; document
starts inside slices and on a slice boundary; a carried state with document starts: RetNet a
random one, the sliding arch the cache of a first call, the causal Transformer none: it carries no
state in training) the same seed builds the same model; each CP rank runs
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
from megaret.models.spec import build_model  # noqa: E402
from megaret.parallel.context import build_parallel_context, destroy_parallel_context  # noqa: E402
from megaret.parallel.cpu_adapters import seed_tensor_parallel_rng  # noqa: E402
from megaret.parallel.megatron_config import megatron_config  # noqa: E402

B, T, V, HEADS = 2, 32, 128, 4
CONFIGS = {"retnet": "configs/tiny.yaml", "transformer": "configs/transformer-tiny.yaml",
           "sliding": "configs/sliding-tiny.yaml"}
CASES = {"retnet": ("plain", "resets", "state"), "transformer": ("plain", "resets"),
         "sliding": ("plain", "resets", "state")}


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


def gather_heads(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, H_part, ...) -> (B, H_part * size, ...) over `group`, in rank order."""
    if size == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(pieces, t.detach().contiguous(), group=group)
    return torch.cat(pieces, 1)


def final_state(arch: str, state, ctx) -> torch.Tensor:
    """The sequence's final state, whole (heads over TP): RetNet's, the same on every CP rank; the
    sliding arch's cached keys and values of the last block (the last CP rank's, returned by every
    rank), keys outside the last document zeroed; the causal Transformer's whole-sequence cache
    (heads over CP within a TP rank, Ulysses)."""
    if arch == "retnet":
        s = torch.cat([layer for layer in state.layers])
    else:
        s = torch.cat([torch.cat([c.k, c.v], -1) * c.valid[:, None, :, None] for c in state.layers])
    if arch == "transformer":
        return gather_heads(gather_heads(s, ctx.cp.group, ctx.cp.size), ctx.tp.group, ctx.tp.size)
    pieces = [torch.empty_like(s) for _ in range(ctx.cp.size)]
    dist.all_gather(pieces, s.detach().contiguous(), group=ctx.cp.group)
    assert all(torch.equal(p, pieces[0]) for p in pieces), "CP ranks return different states"
    return gather_heads(s.detach(), ctx.tp.group, ctx.tp.size)


_CONTEXTS: dict = {}


def context(tp: int, cp: int, seed: int):
    """The parallel context of a layout, built once per layout (megatron's groups cost seconds on gloo),
    with the weights' generators reseeded as a fresh build would."""
    if (tp, cp) not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[tp, cp] = build_parallel_context(tp, 1, seed=seed, context_parallel=cp)
    ctx = _CONTEXTS[tp, cp]
    seed_tensor_parallel_rng(seed, ctx.tp.rank)
    return ctx


def run(cp: int, tp: int, case: str, kernel: str = "torch", mode: str | None = None, arch: str = "retnet"):
    overrides = [f"parallel.tensor={tp}", f"model.num_heads={HEADS}", f"model.vocab_size={V}"]
    overrides += ["model.chunk_size=4", f"model.retention_kernel={kernel}"] if arch == "retnet" else []
    overrides += ["model.block_size=8"] if arch == "sliding" else []
    cfg = load_config(CONFIGS[arch], overrides)
    ctx = context(tp, cp, cfg.train.seed)
    torch.manual_seed(11)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp, cp=ctx.cp)
    data = batch()
    lo, hi = ctx.cp.rank * T // cp, (ctx.cp.rank + 1) * T // cp  # this rank's slice
    kw = {} if mode is None else {"retention_mode": mode}
    if case != "plain":
        kw["doc_start"] = data["doc_start"][:, lo:hi]
    if case == "state" and arch == "retnet":
        kw["state"] = carried(model, tp, ctx.tp.rank)
    elif case == "state":  # the cache a first segment leaves (the last CP rank's, on every rank)
        first = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(9))[:, lo:hi]
        with torch.no_grad():
            kw["state"] = model(first).state
    out = model(data["x"][:, lo:hi], data["y"][:, lo:hi], **kw)
    (out.loss * data["w"][:, lo:hi]).sum().backward()
    for p in model.parameters():  # CP peers' gradients are summed (the trainer: over DP x CP)
        dist.all_reduce(p.grad, group=ctx.cp.group)
    logits = gather_cp(model.gather_logits(out.logits).detach(), ctx, 1)  # (B, T, V)
    loss = gather_cp(out.loss.detach(), ctx, 1)  # (B, T)
    return {"logits": logits, "loss": loss, "grads": gather_full([model], ctx, lambda p: p.grad),
            "state": final_state(arch, out.state, ctx), "position": out.state.position}


def compare(got: dict, ref: dict) -> dict:
    assert got["grads"].keys() == ref["grads"].keys()
    return {"logits_rel": rel(got["logits"], ref["logits"]), "loss_rel": rel(got["loss"], ref["loss"]),
            "grad_rel_max": max(rel(got["grads"][n], ref["grads"][n]) for n in ref["grads"]),
            "state_rel": rel(got["state"], ref["state"]), "position_ok": got["position"] == ref["position"]}


def main() -> None:
    archs = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--archs=")), "retnet").split(",")
    layouts = [tuple(map(int, a.split(","))) for a in sys.argv[1:] if not a.startswith("--")]
    name = {arch: "" if arch == "retnet" else f"{arch}/" for arch in archs}
    refs = {(arch, c): run(1, 1, c, arch=arch) for arch in archs for c in CASES[arch]}  # one process
    parallel = not FLA and "retnet" in archs  # the parallel form on the slices too
    if parallel:
        refs["parallel"] = run(1, 1, "resets", mode="parallel")
    results = {}
    for cp, tp in layouts:  # layout by layout: one parallel context each
        for arch in archs:
            for case in CASES[arch]:
                got = run(cp, tp, case, "fla" if FLA else "torch", arch=arch)
                key = f"{'fla/' if FLA else ''}{name[arch]}cp{cp}tp{tp}/{case}"
                results[key] = compare(got, refs[arch, case])
        if parallel and (cp, tp) == layouts[0]:
            results[f"parallel/cp{cp}"] = compare(run(cp, 1, "resets", mode="parallel"), refs["parallel"])
    print_result(results)
    destroy_parallel_context()


if __name__ == "__main__":
    sys.exit(main())
