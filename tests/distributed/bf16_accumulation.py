"""Launched by tests/test_bf16_accumulation.py (2 ranks): bf16 gradients accumulate in fp32.

    bf16_accumulation.py DIR

For each layout (PP=1 x DP=2, and PP=2), one real train step of a bf16 run with 4 micro-batches
per rank. Every micro-batch's bf16 gradient is recorded as DeepSpeed's BF16_Optimizer receives it
(its post-accumulate-grad hook), and the gradient the optimizer steps from (after the reduction
over DP) is read just before the step. Reported per layout: that gradient against the fp32 sum of
the recorded bf16 micro-gradients, averaged over DP here in fp64 (expected: fp32 rounding), and
against the same sum accumulated in bf16 (the negative control: what accumulating in bf16 gives).
Rank 0 prints one line `RESULT {json}`.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from _common import report_and_close  # tests/distributed/_common.py (the script's own folder)
from megatron.core import parallel_state as ps

from megaret.config import load_config
from megaret.train.trainer import Trainer

BASE = [
    "model.num_layers=2", "model.vocab_size=128", "model.chunk_size=16", "data.seq_length=32",
    "train.steps=1", "train.micro_batch_size=1", "train.log_interval=100", "train.eval_steps=0",
    "optimizer.warmup_steps=1", "optimizer.clip_grad=0.0", "logging.tensorboard=false",
    "data.source=synthetic", "checkpoint.resume=false", "checkpoint.interval=100000",
    "train.precision=bf16",
]


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)  # the fp32 gradients are flat views
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def one_layout(run_dir: str, overrides: list[str]) -> dict:
    cfg = load_config("configs/tiny.yaml", [*BASE, f"run.dir={run_dir}", *overrides])
    trainer = Trainer(cfg)
    opt = trainer.engine.optimizer
    micro: dict[int, list[torch.Tensor]] = defaultdict(list)  # id(param) -> its bf16 micro-gradients
    update = opt._update_hp_grad

    def recording(lp, group_idx, param_idx, clear_lp_grads):  # noqa: ANN001, ANN202
        if lp.grad is not None:
            micro[id(lp)].append(lp.grad.detach().clone())
        return update(lp, group_idx, param_idx, clear_lp_grads)

    opt._update_hp_grad = recording
    stepped: dict[int, torch.Tensor] = {}
    step = trainer.engine.step

    def snapshot_then_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for p in (p for s in trainer.stages for p in s.parameters()):
            stepped[id(p)] = p._hp_grad.detach().clone()
        return step(*args, **kwargs)

    trainer.engine.step = snapshot_then_step
    trainer.train_step()
    params = [p for s in trainer.stages for p in s.parameters()]
    dp_group, dp = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
    fp32_err, bf16_err, counts = 0.0, 0.0, set()
    for p in params:
        grads = micro[id(p)]
        counts.add(len(grads))
        exact = torch.stack([g.double() for g in grads]).sum(0)  # the fp32 accumulation, exactly
        in_bf16 = torch.zeros_like(grads[0])
        for g in grads:
            in_bf16 += g  # what accumulating in the parameter's dtype would give
        in_bf16 = in_bf16.double()
        dist.all_reduce(exact, group=dp_group)
        dist.all_reduce(in_bf16, group=dp_group)
        got = stepped[id(p)]
        fp32_err = max(fp32_err, norm_rel(got, exact / dp))
        bf16_err = max(bf16_err, norm_rel(in_bf16 / dp, exact / dp))
    out = {"optimizer": type(opt).__name__,
           "hp_grad_dtypes": sorted({str(g.dtype) for g in stepped.values()}),
           "param_dtypes": sorted({str(p.dtype) for p in params}), "micro_batches_seen": sorted(counts),
           "n_params": len(params), "fp32_accumulation_rel": fp32_err, "bf16_accumulation_rel": bf16_err,
           "dp": dp, "lp_grads_freed": all(p.grad is None for p in params)}
    trainer.close()
    return out


def main() -> None:
    work = sys.argv[1]
    report = {
        "pp1_dp2": one_layout(f"{work}/pp1", ["train.global_batch_size=8"]),  # 4 micro-batches per DP rank
        "pp2": one_layout(f"{work}/pp2", ["parallel.pipeline=2", "train.global_batch_size=4"]),
        "zero0": one_layout(f"{work}/zero0", ["parallel.zero_stage=0", "train.global_batch_size=8"]),
    }
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
