"""What the trainer tells the user (rank 0, stdout): the start banner, a line per checkpoint saved,
and the end summary with the commands to run next.

The banner, printed when training starts (after the resume), says what runs where: the model and
its parameter count, the parallel layout (the ``parallel:`` line) and the MFU rule, the tokens per
step, the data with its token counts, run.dir, and whether the run is fresh or resumed (from which
checkpoint, at which step). The summary at the end says what was trained, the last losses, where
the last checkpoint is, and the generate / evaluate / export / tensorboard commands for it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from megaret.config import Config
from megaret.models.spec import param_count
from megaret.parallel.cpu_adapters import cpu_adapters_active
from megaret.train.metrics import DevicePeak, mfu_rule


def human(n: float) -> str:
    """1234567 -> "1.23 M" (K, M, B, T)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}"
    return f"{n:g}"


def size_text(n_bytes: int) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {suffix}"
    return f"{n_bytes} B"


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def tokens_per_step(cfg: Config) -> int:
    return cfg.train.global_batch_size * cfg.data.seq_length


def parallel_line(ctx: Any) -> str:
    """The layout line (bench/gpu_check.py reads its backend, device and adapters)."""
    return (f"parallel: world {ctx.world_size} = TP {ctx.tp.size} x PP {ctx.pp_size} x DP {ctx.dp_size} | "
            f"backend {ctx.backend} | device {ctx.device} | CPU adapters "
            f"{'on' if cpu_adapters_active() else 'off'}")


def data_lines(cfg: Config, batches: Any) -> list[str]:
    """One line per training dataset: where, its train and valid token counts, and how many epochs
    of it train.steps is."""
    if cfg.data.source == "synthetic":
        return [f"data: synthetic bigram task (vocab {cfg.model.vocab_size}; tests and smoke runs)"]
    sets = getattr(getattr(batches, "loader", None), "sets", None)
    if not sets:
        return [f"data: {cfg.data.source} (a batch source given by the caller)"]
    weights = cfg.data.weights or [1.0] * len(sets)
    lines, train_tokens = [], 0
    for s, weight in zip(sets, weights, strict=False):
        splits = s.manifest.get("splits", {})
        train, valid = splits.get("train", {}), splits.get("valid", {})
        train_tokens += int(train.get("tokens") or 0)
        share = f" (weight {weight:g})" if len(sets) > 1 else ""
        lines.append(f"data: {s.location}{share}: train {train.get('tokens', 0):,} tokens in "
                     f"{train.get('documents', 0):,} documents, valid {valid.get('tokens', 0):,} tokens")
    planned = cfg.train.steps * tokens_per_step(cfg)
    if train_tokens:
        lines[-1] += f"; train.steps reads {planned:,} tokens = {planned / train_tokens:.3g} epochs"
    return lines


def start_line(cfg: Config, start: Any) -> str:
    """Fresh, resumed (from which checkpoint, at which step) or started from another run's checkpoint."""
    steps = cfg.train.steps
    if start.checkpoint is None:
        return f"start: fresh, step 0 of {steps}"
    if start.own:
        return f"start: resumed from {start.checkpoint} at step {start.step} of {steps}"
    return (f"start: from {start.checkpoint} (checkpoint.load_mode={start.load_mode}) at step {start.step} "
            f"of {steps}")


def start_banner(cfg: Config, ctx: Any, start: Any, batches: Any, peak: DevicePeak | None) -> str:
    """The banner's lines, joined (printed by rank 0 when training starts)."""
    m, t, run = cfg.model, cfg.train, cfg.run.dir
    n_micro = t.global_batch_size // (t.micro_batch_size * ctx.dp_size)
    tb_dir = shlex.quote(str(Path(run) / "tensorboard"))
    board = (f"every step is in TensorBoard: tensorboard --logdir {tb_dir}" if cfg.logging.tensorboard
             else "TensorBoard off (logging.tensorboard=false)")
    tps, n = tokens_per_step(cfg), param_count(m)
    lines = [
        f"megaret: training {m.arch}, {human(n)} parameters ({n:,}: {m.num_layers} layers, hidden "
        f"{m.hidden_size}, vocab {m.vocab_size}), {t.precision}, ZeRO {cfg.parallel.zero_stage}",
        parallel_line(ctx),
        mfu_rule(m, cfg.data.seq_length, peak, ctx.world_size),
        f"batch: {t.global_batch_size} sequences x {cfg.data.seq_length} tokens = {tps:,} tokens per step "
        f"(micro-batch {t.micro_batch_size} x {n_micro} accumulation x DP {ctx.dp_size}); {t.steps:,} "
        f"steps = {t.steps * tps:,} tokens",
        *data_lines(cfg, batches),
        f"run.dir: {run} (config.yaml, checkpoints/ every {cfg.checkpoint.interval} steps, tensorboard/, "
        "logs/third_party-rank*.log)",
        start_line(cfg, start),
        f"console: loss, grad norm and tok/s are means over the steps since the previous line; {board}",
    ]
    return "\n".join(lines)


def checkpoint_line(step: int, path: Path, seconds: float) -> str:
    """`checkpoint saved: step N -> PATH (SIZE, S s)`."""
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return f"checkpoint saved: step {step} -> {path} ({size_text(size)}, {seconds:.2f} s)"


def next_commands(run_dir: str) -> list[str]:
    """The commands that use a finished run: sample, score, export, look at its curves."""
    run = shlex.quote(run_dir)
    out = shlex.quote(str(Path(run_dir) / "model.pt"))
    board = shlex.quote(str(Path(run_dir) / "tensorboard"))
    return [
        f"  generate:    python -m megaret.generate --checkpoint {run} --prompt 'def main(' "
        "--max-new-tokens 64",
        f"  evaluate:    python -m megaret.evaluate --checkpoint {run} --max-docs 20",
        f"  export:      python -m megaret.export --checkpoint {run} --out {out}",
        f"  tensorboard: tensorboard --logdir {board}",
    ]


def end_summary(cfg: Config, first_step: int, step: int, seconds: float, last_line: dict[str, float],
                last_eval: float | None, checkpoint: Path | None) -> str:
    """What this run trained (steps first_step..step), its last losses, the last checkpoint, next commands."""
    tps = tokens_per_step(cfg)
    trained = max(step - first_step + 1, 0)
    steps = f"steps {first_step}-{step}" if trained else "no step (already there)"
    lines = [f"done: {steps} of {cfg.train.steps} in {duration(seconds)} "
             f"({trained * tps:,} tokens this run, {step * tps:,} in all)"]
    if last_line:
        lines[0] += f" | loss {last_line['loss']:.4f} (mean of the last {int(last_line['steps'])} step(s))"
    if last_eval is not None:
        lines[0] += f" | eval loss {last_eval:.4f}"
    if checkpoint is not None:
        lines.append(f"last checkpoint: {checkpoint}")
    lines += ["next:", *next_commands(cfg.run.dir)]
    return "\n".join(lines)
