"""Launched by tests/test_tp_parity.py on CPU ranks: RetNet at TP=2 (and TP=4) equals TP=1.

Arguments: [--fla] and the TP sizes to check (default 2 4; the world size must be a multiple
of each).

For each TP size the same seed builds the same full model (megatron's CPU initialisation
slices one master weight), runs the same batch forward and backward, and the full-vocabulary
logits and every parameter gradient (shards gathered along their partition dim) are
compared with the TP=1 run. With --fla, also at TP=1 and each TP size: model.retention_kernel=fla
against torch (chunk form, a carried state and document resets), under Triton's interpreter
(tests/kernels_adapters.py, installed before megatron-core imports triton). Rank 0 prints one
line `RESULT {json}`.
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


def grad_norm(model: RetNet, ctx) -> float:
    """Global grad norm counting each shard once and each replicated param once."""
    sq = torch.zeros(())
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False) or ctx.tp.rank == 0:
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=ctx.tp.group)
    return sq.sqrt().item()


def carried(model: RetNet, tp: int, rank: int) -> RetNetState:
    """A random carried state, this rank's heads of one full (B, H, Dk, Dv) state per layer."""
    gen = torch.Generator().manual_seed(7)
    layers = []
    for layer in model.layers:
        m = layer.retention
        full = torch.randn(2, m.local_heads * tp, m.key_dim, m.value_dim, generator=gen) * 0.3
        layers.append(full[:, rank * m.local_heads : (rank + 1) * m.local_heads])
    return RetNetState(layers, 24)


def run(tp: int, mode: str, ffn: str, kernel: str = "auto", stateful: bool = False):
    overrides = [f"parallel.tensor={tp}", f"model.ffn_type={ffn}", "model.num_heads=4",
                 "model.vocab_size=128", "model.chunk_size=8", f"model.retention_kernel={kernel}"]
    cfg = load_config("configs/tiny.yaml", overrides)
    ctx = build_parallel_context(tp, 1, seed=cfg.train.seed)
    torch.manual_seed(11)
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp)
    missing = [n for n, p in model.named_parameters()
               if p.dim() == 2 and not getattr(p, "tensor_model_parallel", False)]
    assert not missing, f"weights without the tensor_model_parallel attribute: {missing}"
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(128, (2, 24), generator=gen)
    y = torch.randint(128, (2, 24), generator=gen)
    kw = {}
    if stateful:  # documents start inside sample 0 and at sample 1's first token
        doc_start = torch.zeros(2, 24, dtype=torch.bool)
        doc_start[0, [7, 20]] = doc_start[1, 0] = True
        kw = {"state": carried(model, tp, ctx.tp.rank), "doc_start": doc_start}
    out = model(x, y, retention_mode=mode, **kw)
    w = torch.rand(out.loss.shape, generator=gen)
    (out.loss * w).sum().backward()
    logits = model.gather_logits(out.logits).detach()
    return logits, gather_full([model], ctx, lambda p: p.grad), grad_norm(model, ctx), ctx


def main() -> None:
    tp_sizes = [int(a) for a in sys.argv[1:] if a != "--fla"] or [2, 4]
    results = {}
    for mode, ffn in (("chunk", "gelu"), ("parallel", "swiglu")):
        ref_logits, ref_grads, ref_norm, _ = run(1, mode, ffn)
        for tp in tp_sizes:
            logits, grads, norm, ctx = run(tp, mode, ffn)
            assert grads.keys() == ref_grads.keys()
            worst_grad = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
            results[f"{mode}/{ffn}/tp{tp}"] = {
                "logits_rel": rel(logits, ref_logits),
                "grad_rel_max": worst_grad,
                "grad_norm_rel": abs(norm - ref_norm) / ref_norm,
            }
    for tp in [1, *tp_sizes] if FLA else []:  # the fla kernel against the torch chunk form
        ref_logits, ref_grads, _, _ = run(tp, "chunk", "gelu", "torch", stateful=True)
        logits, grads, _, _ = run(tp, "chunk", "gelu", "fla", stateful=True)
        results[f"fla/tp{tp}"] = {"logits_rel": rel(logits, ref_logits),
                                  "grad_rel_max": max(rel(grads[n], ref_grads[n]) for n in ref_grads)}
    print_result(results)
    destroy_parallel_context()


if __name__ == "__main__":
    sys.exit(main())
