"""Training metrics: a progress line and TensorBoard scalars, written by one rank.

Scalars (TensorBoard, every step, tag `train/<name>`): loss, ppl, lr, grad_norm, tokens_per_s,
tflops (achieved model TFLOP/s of the whole job), memory_mib (this rank's peak: max allocated
on a GPU, max RSS on the CPU), skipped_steps, tokens_seen, step_time_s (the timed optimizer
step), data_time_s (the batch fetch before it), and mfu when a peak is known. Evaluation
(every train.eval_interval steps): eval/loss, eval/ppl. The config, hparams and the by-tokens
run: megaret/train/tb.py.

The console line every train.log_interval steps reports means over the steps since the previous
line: the loss and grad norm of the steps that were not skipped, tokens/s (TFLOP/s, MFU) as the
window's tokens over its step time; lr, memory and the skip count are the current values.

How FLOPs are counted (`model_flops_per_token`): the arch spec's one counting rule
(megaret/models/spec.py: weight matmuls exactly, the mixer by a documented formula per layer
kind), times 3 for training (forward + backward, which is twice the forward). Recomputation is
not counted (model FLOPs, not hardware FLOPs). MFU = achieved FLOP/s of the job /
(logging.peak_tflops * world size); without logging.peak_tflops the card's bf16 dense peak is
looked up from its name and memory (`card_peak`: H100 SXM / PCIe / NVL and H200 told apart)
and MFU is skipped on the CPU. The trainer prints the rule and the peak once at start
(`mfu_rule`), so every MFU figure comes with what it divides.

Step time (tokens/s, TFLOP/s, MFU) is the optimizer step alone: the batch is fetched before the
timer starts, and on a GPU the timer synchronizes the device at both ends.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megaret.config import Config, ModelConfig
from megaret.models.spec import arch_spec
from megaret.train.step import StepResult

SCALARS = ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "tflops", "memory_mib", "skipped_steps",
           "tokens_seen", "step_time_s", "data_time_s")

@dataclass(frozen=True)
class DevicePeak:
    """The bf16 dense peak of one device and where the figure came from."""

    card: str  # e.g. "H100 SXM"
    tflops: float
    source: str  # e.g. "NVIDIA H100 80GB HBM3, 79.2 GiB" or "logging.peak_tflops"

    def describe(self) -> str:
        return f"{self.tflops:g} TFLOP/s bf16 dense ({self.card}: {self.source})"


# bf16 dense (no sparsity) tensor-core peak per GPU, TFLOP/s: NVIDIA's datasheet figures, which are
# quoted with 2:4 sparsity, halved. H100 SXM5 and H200 share the chip and clocks (989.4); the PCIe card
# has 114 SMs at lower clocks (756.5); the NVL cards run at a lower power limit (835.5 per GPU).
CARD_PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200": 989.4, "H200 NVL": 835.5,
    "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
}  # fmt: skip


def card_of(name: str, memory_bytes: int) -> str | None:
    """Which `CARD_PEAK_TFLOPS` card a CUDA device is, from torch.cuda.get_device_name and its memory.

    H100s report "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe" (80 GB HBM2e) and "NVIDIA H100 NVL"
    (94 GB); a bare "NVIDIA H100" is told by memory (94 GB: NVL). H200s report "NVIDIA H200" (SXM, 141
    GB) or "NVIDIA H200 NVL"."""
    gib = memory_bytes / 2**30
    upper = name.upper()
    if "GH200" in upper:
        return "GH200"
    if "H200" in upper:
        return "H200 NVL" if "NVL" in upper else "H200"
    if "H100" in upper or "H800" in upper:
        if "PCIE" in upper:
            return "H100 PCIe"
        if "NVL" in upper or 88 <= gib < 100:
            return "H100 NVL"
        return "H100 SXM"
    for card in ("A100", "L40S", "A10G", "V100"):
        if card in upper:
            return card
    return None


def card_peak(name: str, memory_bytes: int) -> DevicePeak | None:
    """The bf16 dense peak of a CUDA device by name and memory (None: not a card we know)."""
    card = card_of(name, memory_bytes)
    if card is None:
        return None
    return DevicePeak(card, CARD_PEAK_TFLOPS[card], f"{name}, {memory_bytes / 2**30:.1f} GiB")


def device_peak(cfg: Config, device: torch.device | None = None) -> DevicePeak | None:
    """Peak of one device: logging.peak_tflops, or the CUDA card's (`card_peak`), or None (CPU)."""
    if cfg.logging.peak_tflops is not None:
        return DevicePeak("configured", float(cfg.logging.peak_tflops), "logging.peak_tflops")
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        props = torch.cuda.get_device_properties(device)
        return card_peak(props.name, props.total_memory)
    return None


def peak_tflops(cfg: Config, device: torch.device | None = None) -> float | None:
    """Peak TFLOP/s of one device: logging.peak_tflops, or the GPU's (`device_peak`), or None."""
    peak = device_peak(cfg, device)
    return None if peak is None else peak.tflops


def model_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token of the model `cfg` (its spec's rule)."""
    return arch_spec(cfg.arch).flops_per_token(cfg, seq_length).training


def mfu_rule(cfg: ModelConfig, seq_length: int, peak: DevicePeak | None, devices: int = 1) -> str:
    """One line: how MFU is counted for this model (the spec's FLOPs) and the peak it divides by."""
    f = arch_spec(cfg.arch).flops_per_token(cfg, seq_length)
    rule = (f"MFU rule: 3 x (weights {f.weights / 1e9:.4g} + mixer {f.mixer / 1e9:.4g} GFLOP) = "
            f"{f.training / 1e9:.4g} GFLOP per token at T={seq_length} (megaret/models/spec.py "
            "flops_per_token; training = 3 x forward, recomputation not counted)")
    if peak is None:
        return rule + " | peak unknown (CPU, or a card not in CARD_PEAK_TFLOPS): MFU not logged"
    return rule + f" | peak {peak.describe()} x {devices} device(s)"


def peak_memory_mib(device: torch.device | None = None) -> float:
    """This process's peak memory: max allocated on a CUDA device, else max RSS (MiB)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else loss


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Metrics:
    """Every step's scalars to TensorBoard (`megaret.train.tb.Board`, writer rank only); a console
    line every `log_interval` steps (and at this run's first step, the last step and a skipped one)
    whose loss, grad norm and throughput are means over the steps since the previous line."""

    def __init__(self, run_dir: str | Path, writer_rank: bool, tensorboard: bool, log_interval: int,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 device: torch.device | None = None, *, tokens_per_step: int = 0, start_step: int = 0,
                 config: dict | None = None) -> None:
        """flops_per_token: training FLOPs per token; peak_flops: the whole job's peak FLOP/s;
        tokens_per_step: global batch x sequence length; start_step: the step this run goes on from
        (TensorBoard drops older points after it); config: the resolved config, for TensorBoard."""
        self.writer_rank = writer_rank
        self.log_interval = log_interval
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.device = device
        self.tokens_per_step = tokens_per_step
        self.step_times: list[float] = []
        self.steps_logged = 0  # by this run
        self.window = Window()
        self.last_line: dict[str, float] = {}  # the means of the last printed line
        self.last_eval: float | None = None
        self.tb = None
        if writer_rank and tensorboard:
            from megaret.train.tb import Board

            self.tb = Board(run_dir, start_step, tokens_per_step, config)

    def eta_seconds(self, step: int, total_steps: int) -> float:
        """Remaining steps times the mean step time (the first, warm-up step left out once there are more)."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return (total_steps - step) * (sum(times) / len(times)) if times else float("nan")

    def log(self, step: int, result: StepResult, tokens_per_s: float, skipped_steps: int,
            total_steps: int, step_time: float | None = None) -> dict[str, float]:
        """step_time: the step's wall time with its batch fetch (the ETA's unit); tokens_per_s
        counts the optimizer step alone."""
        if step_time is not None:
            self.step_times.append(step_time)
        self.steps_logged += 1
        if not self.writer_rank:
            return {}
        tflops = self.flops_per_token * tokens_per_s / 1e12 if self.flops_per_token else float("nan")
        values = {
            "loss": result.loss,
            "ppl": _ppl(result.loss),
            "lr": result.lr,
            "grad_norm": result.grad_norm if result.grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "tflops": tflops,
            "memory_mib": peak_memory_mib(self.device),
            "skipped_steps": float(skipped_steps),
        }
        if self.tokens_per_step:
            values["tokens_seen"] = float(step * self.tokens_per_step)
            values["step_time_s"] = self.tokens_per_step / tokens_per_s  # the timed step (Timer)
            if step_time is not None:
                values["data_time_s"] = max(step_time - values["step_time_s"], 0.0)
        if self.peak_flops:
            values["mfu"] = tflops * 1e12 / self.peak_flops
        if self.tb is not None:
            self.tb.scalars("train", values, step)
            if not result.skipped:
                self.tb.by_tokens("train_loss", result.loss, step)
        self.window.add(result, tokens_per_s)
        first = self.steps_logged == 1  # this run's first step: a line at once, also after a resume
        if step % self.log_interval == 0 or first or step == total_steps or result.skipped:
            self._print(step, total_steps, result, values, skipped_steps)
        return values

    def _print(self, step: int, total_steps: int, result: StepResult, values: dict[str, float],
               skipped_steps: int) -> None:
        w, self.window = self.window, Window()
        rate = w.tokens_per_s()
        tflops = self.flops_per_token * rate / 1e12 if self.flops_per_token else float("nan")
        self.last_line = {"loss": w.mean_loss(), "steps": w.steps, "tokens_per_s": rate}
        note = "  SKIPPED (non-finite loss/grad)" if result.skipped else ""
        mfu = f" | MFU {tflops * 1e12 / self.peak_flops:.1%}" if self.peak_flops else ""
        print(f"step {step:6d}/{total_steps} | loss {w.mean_loss():.4f} | lr {result.lr:.3e} | "
              f"grad norm {w.mean_grad_norm():.3f} | {rate:,.0f} tok/s | {tflops:.3g} TFLOP/s"
              f"{mfu} | mem {values['memory_mib']:,.0f} MiB | skipped {skipped_steps} | "
              f"ETA {_duration(self.eta_seconds(step, total_steps))}{note}", flush=True)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.writer_rank:
            return
        self.last_eval = loss
        if self.tb is not None:
            self.tb.scalars("eval", {"loss": loss, "ppl": _ppl(loss)}, step)
            self.tb.by_tokens("eval_loss", loss, step)
        print(f"eval at step {step:6d} | loss {loss:.4f} | ppl {_ppl(loss):.2f}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class Window:
    """The steps since the last console line: what the line reports is their mean."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)  # finite (not skipped) steps only
    grad_norms: list[float] = field(default_factory=list)
    seconds_per_token: float = 0.0  # sum over the steps of 1 / tokens_per_s

    def add(self, result: StepResult, tokens_per_s: float) -> None:
        self.steps += 1
        if not result.skipped and math.isfinite(result.loss):
            self.losses.append(result.loss)
            if result.grad_norm is not None and math.isfinite(result.grad_norm):
                self.grad_norms.append(result.grad_norm)
        self.seconds_per_token += 1.0 / tokens_per_s

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def mean_grad_norm(self) -> float:
        return sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else float("nan")

    def tokens_per_s(self) -> float:
        """Tokens over seconds of the window's steps (each step the same tokens): the harmonic mean."""
        return self.steps / self.seconds_per_token if self.seconds_per_token else float("nan")


class Timer:
    """Wall time of a block, with a device sync on CUDA at both ends: the block's own work, all of it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Timer:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
