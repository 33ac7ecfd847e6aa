"""Training metrics: a progress line and TensorBoard scalars, written by one rank."""

from __future__ import annotations

import math
from pathlib import Path

from megaret.train.step import StepResult

SCALARS = ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "skipped_steps")


class Metrics:
    """Prints every `log_interval` steps; writes every step's scalars under run_dir/tensorboard."""

    def __init__(self, run_dir: str | Path, writer_rank: bool, tensorboard: bool, log_interval: int) -> None:
        self.writer_rank = writer_rank
        self.log_interval = log_interval
        self.tb = None
        if writer_rank and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, result: StepResult, tokens_per_s: float, skipped_steps: int,
            total_steps: int) -> None:
        if not self.writer_rank:
            return
        values = {
            "loss": result.loss,
            "ppl": math.exp(min(result.loss, 50.0)) if math.isfinite(result.loss) else result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm if result.grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "skipped_steps": float(skipped_steps),
        }
        if self.tb is not None:
            for name in SCALARS:
                self.tb.add_scalar(f"train/{name}", values[name], step)
        if step % self.log_interval == 0 or step in (1, total_steps) or result.skipped:
            note = "  SKIPPED (non-finite loss/grad)" if result.skipped else ""
            print(f"step {step:6d} | loss {result.loss:.4f} | lr {result.lr:.3e} | "
                  f"grad norm {values['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | "
                  f"skipped {skipped_steps}{note}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
