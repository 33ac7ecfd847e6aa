"""Launched by tests/test_tp_parity.py on CPU ranks: RetNet at TP=2 (and TP=4) equals TP=1.

Arguments: the TP sizes to check (default 2 4; the world size must be a multiple of each).

For each TP size the same seed builds the same full model (megatron's CPU initialisation
slices one master weight), runs the same batch forward and backward, and the full-vocabulary
logits and every parameter gradient (shards gathered along their partition dim) are
compared with the TP=1 run. Rank 0 prints one line `RESULT {json}`.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _common import print_result, rel  # tests/distributed/_common.py (the script's own folder)

from megaret.checkpoint.gather import gather_full
from megaret.config import load_config
from megaret.models.retnet import RetNet
from megaret.parallel.context import build_parallel_context, destroy_parallel_context
from megaret.parallel.megatron_config import megatron_config


def grad_norm(model: RetNet, ctx) -> float:
    """Global grad norm counting each shard once and each replicated param once."""
    sq = torch.zeros(())
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False) or ctx.tp.rank == 0:
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=ctx.tp.group)
    return sq.sqrt().item()


def run(tp: int, mode: str, ffn: str):
    overrides = [f"parallel.tensor={tp}", f"model.ffn_type={ffn}", "model.num_heads=4",
                 "model.vocab_size=128", "model.chunk_size=8"]
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
    out = model(x, y, retention_mode=mode)
    w = torch.rand(out.loss.shape, generator=gen)
    (out.loss * w).sum().backward()
    logits = model.gather_logits(out.logits).detach()
    return logits, gather_full([model], ctx, lambda p: p.grad), grad_norm(model, ctx), ctx


def main() -> None:
    tp_sizes = [int(a) for a in sys.argv[1:]] or [2, 4]
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
    print_result(results)
    destroy_parallel_context()


if __name__ == "__main__":
    sys.exit(main())
