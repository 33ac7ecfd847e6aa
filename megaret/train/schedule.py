"""Learning-rate schedule: linear warm-up, then decay to optimizer.min_lr at train.steps."""

from __future__ import annotations

import math

from megaret.config import OptimizerConfig


def learning_rate(step: int, opt: OptimizerConfig, total_steps: int) -> float:
    """The LR of optimizer step `step` (1-based).

    Warm-up: lr * step / warmup_steps for step <= warmup_steps. Then, with progress p running
    from 0 after warm-up to 1 at total_steps:
      polynomial  min + (lr - min) (1 - p)^optimizer.decay_power (fairseq's polynomial_decay;
                  power 1 by default, as in RetNet's recipe)
      cosine      min + (lr - min) (1 + cos pi p) / 2
      linear      min + (lr - min) (1 - p)
      constant    lr
    """
    if step <= opt.warmup_steps:
        return opt.lr * step / max(opt.warmup_steps, 1)
    if opt.decay_style == "constant":
        return opt.lr
    span = max(total_steps - opt.warmup_steps, 1)
    p = min((step - opt.warmup_steps) / span, 1.0)
    if opt.decay_style == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * p))
    elif opt.decay_style == "linear":
        frac = 1.0 - p
    elif opt.decay_style == "polynomial":
        frac = (1.0 - p) ** opt.decay_power
    else:
        raise ValueError(f"optimizer.decay_style: unknown {opt.decay_style!r}")
    return opt.min_lr + (opt.lr - opt.min_lr) * frac
