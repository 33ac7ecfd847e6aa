"""The training loop: build everything from the config once, then step."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megaret import faults
from megaret.checkpoint.gather import full_parameters
from megaret.checkpoint.manager import CheckpointManager
from megaret.checkpoint.model import ModelOptimizer
from megaret.checkpoint.parts import RNG, CarriedStates, DataPosition, Part, Schedule, Shared
from megaret.config import Config, ConfigError, save_config
from megaret.errors import UserError
from megaret.models.spec import arch_spec
from megaret.parallel.agree import agree_or_raise
from megaret.parallel.context import build_parallel_context, launch_world_size, seed_dropout_streams
from megaret.train.banner import checkpoint_line, end_summary, start_banner, tokens_per_step
from megaret.train.batches import Batch, BatchSource, LoaderBatches, SyntheticBatches
from megaret.train.engine import build_engine, build_stage_modules
from megaret.train.metrics import Metrics, Timer, device_peak, model_flops_per_token
from megaret.train.run_lock import hold_run_dir
from megaret.train.schedule import learning_rate
from megaret.train.signals import StopSignals
from megaret.train.start import plan_start
from megaret.train.step import StateCarry, StepResult, eval_step, train_step


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message names the fix."""


class Trainer:
    def __init__(self, cfg: Config, batches: BatchSource | None = None,
                 stop: StopSignals | None = None) -> None:
        """`stop`: signal handlers the caller entered before anything slow (the entry point does);
        a signal caught during start-up is acted on before resuming. Without one, `train` installs
        its own."""
        self.cfg = cfg
        self.stop = stop or StopSignals()
        p = cfg.parallel
        cfg.validate_world(launch_world_size())  # before the rendezvous: every rank refuses alike, none waits
        self.ctx = build_parallel_context(p.tensor, p.pipeline, p.virtual_pipeline, seed=cfg.train.seed,
                                         backend=p.backend, timeout_s=cfg.train.collective_timeout_s,
                                         context_parallel=p.context_parallel)
        self.run_lock = hold_run_dir(cfg.run.dir, self.ctx)  # one trainer per run.dir, before anything writes
        self.start = plan_start(cfg, self.ctx)  # what run.dir holds, checked: resume, load, fresh or done
        self.stages = build_stage_modules(cfg, self.ctx)
        self.engine = build_engine(cfg, self.ctx, self.stages)
        seed_dropout_streams(cfg.train.seed, self.ctx)  # after the weights; a resume restores the streams
        self.batches = batches or self._batch_source()
        self._eval_source = self._open_eval()  # before step 1: a dataset without a valid split stops here
        # rank 0 writes run.dir; if it cannot, every rank stops there with one line
        self.metrics = agree_or_raise(self.ctx, self._prepare_run_dir, everywhere=True)
        # stateful segments: each layer's recurrent state flows on to the slot's next segment
        state_class = arch_spec(cfg.model.arch).state_class
        self.carry = StateCarry(state_class) if cfg.data.packing == "segments" else None
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        cc = cfg.checkpoint
        self.checkpointer = CheckpointManager(Path(cfg.run.dir) / "checkpoints", self._checkpoint_parts(),
                                              self.ctx, cc.keep_last, cc.keep_every,
                                              meta={"config": cfg.to_dict(), "identity": self.start.identity})
        faults.point("before_resume", rank=self.ctx.rank)
        self._leave_if_signalled()  # a signal during start-up: leave before the (slow) resume
        self.resumed_from = self.start.load(self.checkpointer)  # the checkpoint started from, if any
        self.last_checkpoint: Path | None = self.resumed_from if self.start.own else None

    def _prepare_run_dir(self) -> Metrics:
        """run.dir/config.yaml and the TensorBoard writer (rank 0), the metrics (every rank)."""
        try:
            if self.ctx.rank == 0 and not self.start.finished:  # a finished run keeps its config.yaml
                save_config(self.cfg, self.cfg.run.dir)
            return self._build_metrics()
        except OSError as exc:
            raise ConfigError(f"run.dir={self.cfg.run.dir} is not writable ({exc.strerror or exc}: "
                              f"{exc.filename}); set run.dir to a directory this job can write") from exc

    def _checkpoint_parts(self) -> dict[str, Part]:
        """What a checkpoint holds, each part saving and loading itself (loaded in this order:
        the cheap checks first, the RNG last)."""
        cfg, ctx = self.cfg, self.ctx
        parts: dict[str, Part] = {
            "trainer": Shared(self),
            "schedule": Schedule(cfg.optimizer, cfg.train.steps),
            "data": DataPosition(cfg.data.source, ctx.dp_size, getattr(self.batches, "loader", None),
                                 getattr(self.batches, "restart", None)),
        }
        if self.carry is not None:
            parts["carry"] = CarriedStates(self.carry, ctx)
        fused = arch_spec(cfg.model.arch).fused_weights(cfg.model)  # converts older checkpoints
        parts["model"] = ModelOptimizer(self.engine, self.stages, ctx, cfg.parallel.zero_stage,
                                        cfg.train.precision, fused)
        parts["rng"] = RNG()
        return parts

    def state_dict(self) -> dict[str, int]:
        """The trainer's counters (the manifest's "trainer" entry)."""
        c = self.cfg
        return {"step": self.step, "tokens_seen": self.step * c.train.global_batch_size * c.data.seq_length,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]

    def _batch_source(self) -> BatchSource:
        cfg, ctx = self.cfg, self.ctx
        if cfg.data.source == "synthetic":
            return SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_length, cfg.train.global_batch_size,
                                    ctx.dp_size, ctx.dp_rank, cfg.train.seed)
        # TP and PP peers of a DP rank read the same samples: the loader sees only DP coordinates.
        loader = self._open_loader("train")
        return LoaderBatches(loader, cfg.train.global_batch_size // ctx.dp_size, cfg.train.micro_batch_size)

    def _open_loader(self, split: str, **kwargs):
        """build_loader on every rank, the first local rank of each machine first: it verifies
        (hashes) the shards once and stamps them, and the other ranks then open against the
        stamps instead of each reading every shard. If opening fails there, every rank stops
        (the failing one with its message) instead of waiting for it."""
        from megaret.data import DataError, build_loader

        ctx = self.ctx
        loader, error = None, None
        if ctx.local_rank == 0:
            try:
                loader = build_loader(self.cfg, ctx.dp_rank, ctx.dp_size, split=split, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
                error = exc
        if ctx.world_size > 1:
            failed = torch.tensor([float(error is not None)], device=ctx.device)
            dist.all_reduce(failed)
            if failed.item() and error is None:
                raise DataError(f"opening the {split} data failed on another rank (the first rank of its "
                                "machine, which verifies the shards); see that rank's error")
        if error is not None:
            raise error
        if loader is None:
            loader = build_loader(self.cfg, ctx.dp_rank, ctx.dp_size, split=split, **kwargs)
        return loader

    def _build_metrics(self) -> Metrics:
        cfg, ctx = self.cfg, self.ctx
        peak = device_peak(cfg, ctx.device)  # the banner prints it with the MFU rule
        return Metrics(cfg.run.dir, ctx.rank == 0, cfg.logging.tensorboard and not self.start.finished,
                       cfg.train.log_interval,
                       flops_per_token=model_flops_per_token(cfg.model, cfg.data.seq_length),
                       peak_flops=None if peak is None else peak.tflops * 1e12 * ctx.world_size,
                       device=ctx.device, tokens_per_step=tokens_per_step(cfg), start_step=self.start.step,
                       config=cfg.to_dict())

    def _open_eval(self) -> BatchSource | None:
        """The held-out batches' source (None when evaluation is off), opened with the trainer."""
        cfg, ctx = self.cfg, self.ctx
        if not (cfg.train.eval_steps and cfg.train.eval_interval):
            if cfg.data.source == "shards" and ctx.rank == 0:
                t = cfg.train
                print(f"megaret: warning: evaluation is off (train.eval_interval={t.eval_interval}, "
                      f"train.eval_steps={t.eval_steps}): the valid split is not read", file=sys.stderr)
            return None
        if cfg.data.source == "synthetic":
            return self.batches if isinstance(self.batches, SyntheticBatches) else \
                SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_length, cfg.train.global_batch_size,
                                 ctx.dp_size, ctx.dp_rank, cfg.train.seed)
        loader = self._open_loader("valid", num_workers=0)
        self._eval_start = loader.state_dict()
        return LoaderBatches(loader, cfg.train.global_batch_size // ctx.dp_size, cfg.train.micro_batch_size)

    def _eval_batches(self) -> list[Batch]:
        """train.eval_steps batches of the held-out split, the same ones at every evaluation."""
        cfg = self.cfg
        src = self._eval_source  # None only when evaluation is off, and then nothing evaluates
        if isinstance(src, LoaderBatches):
            src.loader.load_state_dict(self._eval_start)
            src.restart()
            return [src.next_batch(i) for i in range(cfg.train.eval_steps)]
        return [src.next_batch(-1 - i) for i in range(cfg.train.eval_steps)]  # negative steps: held out

    def evaluate(self) -> float:
        """Mean loss over train.eval_steps held-out batches, logged as eval/loss and eval/ppl."""
        carry = StateCarry(self.carry.state_type) if self.carry is not None else None
        loss = eval_step(self.stages, self.ctx, self._eval_batches(), self.cfg.train.micro_batch_size, carry)
        self.metrics.log_eval(self.step, loss)
        return loss

    def _profile_step(self) -> None:
        """logging.profile: a torch.profiler trace of steps 2-4 under run.dir/tensorboard/profile."""
        if not self.cfg.logging.profile:
            return
        prof = getattr(self, "_profiler", None)
        if prof is None and self.step == 1:
            import torch.profiler as tp

            out = Path(self.cfg.run.dir) / "tensorboard" / "profile"
            self._profiler = prof = tp.profile(
                schedule=tp.schedule(wait=0, warmup=1, active=2, repeat=1),
                on_trace_ready=tp.tensorboard_trace_handler(str(out), worker_name=f"rank{self.ctx.rank}"),
                record_shapes=False, with_stack=False)
            prof.start()
        elif prof is not None:
            prof.step()
            if self.step >= 4:
                prof.stop()
                self._profiler = False

    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.step += 1
        self._profile_step()
        t_data = time.perf_counter()
        batch = self.batches.next_batch(self.step)  # outside the timed step: tokens/s and MFU are the model's
        if not isinstance(batch, Batch):  # a (tokens, labels) source
            batch = Batch.of(*batch)
        lr = learning_rate(self.step, cfg.optimizer, cfg.train.steps)
        data_seconds = time.perf_counter() - t_data
        with Timer(self.ctx.device) as timer:
            result = train_step(self.engine, self.stages, self.ctx, batch, cfg.train.micro_batch_size,
                                lr, cfg.parallel.zero_stage, self.carry)
        tokens_per_s = cfg.train.global_batch_size * cfg.data.seq_length / timer.seconds
        if result.skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        self.metrics.log(self.step, result, tokens_per_s, self.skipped_steps, cfg.train.steps,
                         timer.seconds + data_seconds)  # the ETA counts the data time too
        if self._eval_source is not None and self.step % cfg.train.eval_interval == 0:
            self.evaluate()
        limit = cfg.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient (last at step "
                f"{self.step}, loss {result.loss}); stopping (train.max_consecutive_skips={limit}). Lower "
                "optimizer.lr, check the data, or raise train.max_consecutive_skips"
            )
        if self.step % cfg.checkpoint.interval == 0:
            self.save_checkpoint()
        return result

    def train(self) -> list[StepResult]:
        """Train to train.steps (on from a resumed step); saves a checkpoint at the end.

        SIGUSR1/SIGUSR2/SIGTERM/SIGINT stop the run after the step in progress: all ranks agree on
        the step, save a checkpoint and raise `Preempted` (exit 75 for a requeue, 130 for SIGINT;
        megaret/train/signals.py).
        """
        results = []
        first_step, t0 = self.step + 1, time.perf_counter()
        if self.ctx.rank == 0:
            peak = device_peak(self.cfg, self.ctx.device)
            print(start_banner(self.cfg, self.ctx, self.start, self.batches, peak), flush=True)
        with self.stop:
            while self.step < self.cfg.train.steps:
                self._leave_if_signalled()
                faults.point("before_step", rank=self.ctx.rank, step=self.step + 1)
                results.append(self.train_step())
        if self.checkpointer.last_saved_step != self.step:
            self.save_checkpoint()
        if self.ctx.rank == 0:
            m, seconds = self.metrics, time.perf_counter() - t0
            print(end_summary(self.cfg, first_step, self.step, seconds, m.last_line, m.last_eval,
                              self.last_checkpoint), flush=True)
        return results

    def _leave_if_signalled(self) -> None:
        """Collective: if a rank caught a stop signal, every rank saves the current step (unless it
        is saved already or nothing was trained yet) and leaves (`StopSignals.leave`)."""
        stop = self.stop
        signum = stop.agreed(self.ctx.device)
        if signum is None:
            return
        if self.step == 0:
            what = "nothing trained yet (still starting), nothing to save"
        elif self.checkpointer.last_saved_step == self.step:
            what = f"the checkpoint of step {self.step} is already saved"
        else:
            self.save_checkpoint()
            what = f"checkpoint of step {self.step} saved"
        if self.ctx.rank == 0:
            name = signal.Signals(signum).name
            then = "exiting (interrupted; run again to resume)" if signum == signal.SIGINT else \
                "exiting for a requeue"
            print(f"caught {name}: {what} ({time.time() - stop.received_at:.1f}s after the signal); {then}"
                  if stop.received_at else f"a peer caught {name}: {what}; {then}", flush=True)
        stop.leave(signum, self.ctx.rank, self.step)

    def save_checkpoint(self) -> Path:
        """Write run.dir/checkpoints/step_NNNNNNN for the current step (every rank calls this)."""
        t0 = time.perf_counter()
        self.last_checkpoint = self.checkpointer.save(self.step)
        if self.ctx.rank == 0:
            print(checkpoint_line(self.step, self.last_checkpoint, time.perf_counter() - t0), flush=True)
        return self.last_checkpoint

    def full_parameters(self):
        """The full model's parameters (gathered over TP and PP) on every rank."""
        return full_parameters(self.stages, self.ctx)

    def close(self) -> None:
        try:
            if getattr(self, "_profiler", None):  # a run shorter than the profiled steps
                self._profiler.stop()
                self._profiler = False
            self.metrics.close()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()
