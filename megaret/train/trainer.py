"""The training loop: build everything from the config once, then step."""

from __future__ import annotations

import time

from megaret.config import Config, save_config
from megaret.parallel.context import build_parallel_context
from megaret.train.batches import BatchSource, LoaderBatches, SyntheticBatches
from megaret.train.engine import build_engine, build_stage_modules, full_parameters
from megaret.train.metrics import Metrics
from megaret.train.schedule import learning_rate
from megaret.train.step import StepResult, train_step


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps)."""


class Trainer:
    def __init__(self, cfg: Config, batches: BatchSource | None = None) -> None:
        self.cfg = cfg
        p = cfg.parallel
        self.ctx = build_parallel_context(p.tensor, p.pipeline, p.virtual_pipeline, seed=cfg.train.seed)
        cfg.validate_world(self.ctx.world_size)
        self.chunks = build_stage_modules(cfg, self.ctx)
        self.engine = build_engine(cfg, self.ctx, self.chunks)
        self.batches = batches or self._batch_source()
        if self.ctx.rank == 0:
            save_config(cfg, cfg.run.dir)
        self.metrics = Metrics(cfg.run.dir, self.ctx.rank == 0, cfg.logging.tensorboard,
                               cfg.train.log_interval)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def _batch_source(self) -> BatchSource:
        cfg, ctx = self.cfg, self.ctx
        if cfg.data.source == "synthetic":
            return SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_length, cfg.train.global_batch_size,
                                    ctx.dp_size, ctx.dp_rank, cfg.train.seed)
        from megaret.data import build_loader

        # TP and PP peers of a DP rank read the same samples: the loader sees only DP coordinates.
        loader = build_loader(cfg, ctx.dp_rank, ctx.dp_size)
        return LoaderBatches(loader, cfg.train.global_batch_size // ctx.dp_size, cfg.train.micro_batch_size)

    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.step += 1
        t0 = time.perf_counter()
        tokens, labels = self.batches.next_batch(self.step)
        lr = learning_rate(self.step, cfg.optimizer, cfg.train.steps)
        result = train_step(self.engine, self.chunks, self.ctx, tokens, labels, cfg.train.micro_batch_size,
                            lr, cfg.parallel.zero_stage)
        tokens_per_s = cfg.train.global_batch_size * cfg.data.seq_length / (time.perf_counter() - t0)
        if result.skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        self.metrics.log(self.step, result, tokens_per_s, self.skipped_steps, cfg.train.steps)
        limit = cfg.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient (last at step "
                f"{self.step}, loss {result.loss}); stopping (train.max_consecutive_skips={limit}). Lower "
                "optimizer.lr, check the data, or raise train.max_consecutive_skips"
            )
        return result

    def train(self) -> list[StepResult]:
        return [self.train_step() for _ in range(self.step, self.cfg.train.steps)]

    def full_parameters(self):
        """The full model's parameters (gathered over TP and PP) on every rank."""
        return full_parameters(self.chunks, self.ctx)

    def close(self) -> None:
        self.metrics.close()
