"""The in-process stages of the GPU check (bench/gpu_check.py runs them, one Python process for all
four, so the imports are paid once): imports, retention (fla vs torch), throughput and decoding.

Each stage is `stage_<name>(smoke, limit) -> dict` with a "status" and its figures; `smoke` means toy
sizes on the CPU. Only the standard library is imported at the top (torch and the project inside the
stages), so the driver's quick calls stay quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import sys
from typing import Any

#: what the project imports, beside torch (name -> why)
IMPORTS: dict[str, str] = {
    "megatron.core": "tensor/pipeline parallel layers and schedules", "deepspeed": "ZeRO",
    "webdataset": "data", "wids": "data", "braceexpand": "data", "submitit": "launcher", "hjson": "deepspeed",
    "pydantic": "deepspeed", "fla": "retention kernels (gpu extra)", "triton": "fla's kernels",
    "numpy": "", "einops": "fla", "yaml": "configs", "tensorboard": "metrics", "tokenizers": "data",
    "tiktoken": "data", "safetensors": "export", "pyarrow": "data tools", "mpi4py": "mpirun launches",
}  # fmt: skip
MEGARET_MODULES = ("megaret.train.trainer", "megaret.launch.slurm", "megaret.data", "megaret.infer.decoding")



def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# stage: imports


def stage_imports(smoke: bool, limit: float) -> dict:
    import torch

    result: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                              "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        from megaret.train.metrics import card_peak

        props = torch.cuda.get_device_properties(0)
        peak = card_peak(props.name, props.total_memory)
        result.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                      sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                      card=peak.card if peak else None, peak_bf16_dense_tflops=peak.tflops if peak else None)
    missing, versions = [], {}
    for name in [*IMPORTS, *MEGARET_MODULES]:
        try:
            module = importlib.import_module(name)
            versions[name] = str(getattr(module, "__version__", "ok"))
        except Exception as exc:  # noqa: BLE001 - an import that fails is what this stage reports
            versions[name] = f"unavailable: {one_line(exc)}"
            missing.append(name)
    result["versions"] = versions
    result["fla_wrapper"] = _optional_module("megaret.ops.retention_fla")
    result["retention_kernel_key"] = retention_kernel_key() or "unavailable: no model.retention_kernel"
    if "deepspeed" not in missing:
        from deepspeed.accelerator import get_accelerator

        result["deepspeed_accelerator"] = get_accelerator()._name
    result["fla_kernel"] = _fla_kernel_call()
    result["missing"] = ",".join(missing) or None
    # --smoke checks only what this environment has; on the GPU machine everything must import
    problems = [] if smoke else [f"missing {m}" for m in missing]
    if not smoke and not str(result["fla_kernel"]).startswith("ok"):
        problems.append(f"fla kernel {result['fla_kernel']}")
    result["status"] = "fail" if problems else "ok"
    if problems:
        result["error"] = "; ".join(problems)[:500]
    return result


def _optional_module(name: str) -> str:
    try:
        importlib.import_module(name)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {one_line(exc)}"


def retention_kernel_key() -> str | None:
    """The choices of model.retention_kernel, or None where this checkout has no such key."""
    from megaret.config.schema import ModelConfig

    for f in dataclasses.fields(ModelConfig):
        if f.name == "retention_kernel":
            return str(f.default)
    return None


def _fla_kernel_call() -> str:
    """One call of fla's chunk_simple_gla against its naive reference ('ok rel_err=...' or why not)."""
    import torch

    if not torch.cuda.is_available():
        return "unavailable: fla's Triton kernels need CUDA"
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {one_line(exc)}"
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", generator=g).bfloat16() for _ in range(3))
    gamma = torch.log1p(-torch.exp2(-5.0 - torch.arange(2.0, device="cuda")))
    o, _ = chunk_simple_gla(q, k, v, g_gamma=gamma, scale=0.125)
    ref, _ = naive_recurrent_simple_gla(q, k, v, gamma.expand(1, 128, 2).contiguous(), scale=0.125)
    err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    return f"ok rel_err={err:.2e}" if err < 2e-2 else f"wrong rel_err={err:.2e}"  # bf16 inputs


# ---------------------------------------------------------------------------------------------
# stage: retention (fla vs torch)


@dataclasses.dataclass(frozen=True)
class RetentionShape:
    heads: int  # global heads of the layer
    local: int  # heads of one TP rank (TP = heads / local)
    dk: int
    dv: int
    chunk: int


def stage_retention(smoke: bool, limit: float, partial: dict | None = None) -> dict:
    import torch

    from bench.device import Clock

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = RetentionShape(8, 4, 256, 512, 256) if not smoke else RetentionShape(4, 2, 16, 32, 32)
    lengths, tokens = ((2048, 16384), 16384) if not smoke else ((64, 256), 256)
    fla, why, resets = fla_kernel()
    if device.type != "cuda":
        fla, why, resets = None, "unavailable: fla's Triton kernels need CUDA", False
    heads = f"{shape.local} local of {shape.heads} (TP {shape.heads // shape.local})"
    result: dict[str, Any] = partial if partial is not None else {}  # filled as it goes (a timeout keeps it)
    result.update({"device": str(device), "dtype": str(dtype).removeprefix("torch."), "fla": why,
                   "heads": heads, "Dk": shape.dk, "Dv": shape.dv, "summary": {}})
    worst = 0.0
    for t in lengths:
        first = t == lengths[0]
        row = result[f"T{t}"] = {}
        _retention_row(row, t, max(1, tokens // t), shape, dtype, device, fla, Clock(device), grads=first,
                       resets=resets and first, reps=(5, 2) if not smoke else (2, 1))
        worst = max([worst, *(v for k, v in row.items() if "rel_err" in k)])
        result["summary"].update({f"T{t}_{k}": v for k, v in row.items()})
    if fla is None:
        result["status"] = "unavailable"
    else:
        result["worst_rel_err"] = worst
        result["status"] = "ok" if worst < 2e-2 else "fail"
        if result["status"] == "fail":
            result["error"] = f"fla and torch retention differ by {worst:.3g} (relative; bf16 allows 2e-2)"
    return result


def _retention_row(row: dict[str, Any], t: int, b: int, shape: RetentionShape, dtype, device, fla,  # noqa: ANN001
                   clock, grads: bool, resets: bool, reps: tuple[int, int]) -> None:  # noqa: ANN001
    """Into `row` as each figure comes (a timeout keeps them), one length: `fla` (megaret's contract:
    (q, k, v, log_decay, initial_state, reset=None) ->
    (o, final_state)) vs the torch chunk form for the decays of TP ranks 0 and 1 (outputs, final
    states; with `grads` the gradients, with `resets` document resets inside the samples), then both
    kernels' forward and forward+backward times (rank 1's decays)."""
    import torch

    from megaret.ops import chunk_retention, retnet_log_decay

    g = torch.Generator(device=device).manual_seed(t)

    def randn(*size: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(dt)

    q, k = (randn(b, t, shape.local, shape.dk, scale=shape.dk**-0.5) for _ in range(2))
    v, s0 = randn(b, t, shape.local, shape.dv), randn(b, shape.local, shape.dk, shape.dv, scale=0.1,
                                                      dt=torch.float32)
    row["B"] = b
    log_decay = None
    for rank in (0, 1):  # TP rank `rank` holds global heads rank*local .. rank*local + local - 1
        log_decay = retnet_log_decay(shape.heads, rank * shape.local, shape.local).to(device)
        ref_o, ref_s = chunk_retention(q, k, v, log_decay, s0, chunk_size=shape.chunk)
        if fla is not None:
            o, s = fla(q, k, v, log_decay, s0)
            row[f"rank{rank}_rel_err_o"] = _rel(o, ref_o)
            row[f"rank{rank}_rel_err_state"] = _rel(s, ref_s)
    if resets and fla is not None:  # documents starting inside the samples (and one at a sample start)
        reset = torch.rand(b, t, generator=g, device=device) < 4 / t
        reset[0, 0] = True
        ref_o, ref_s = chunk_retention(q, k, v, log_decay, s0, chunk_size=shape.chunk, reset=reset)
        o, s = fla(q, k, v, log_decay, s0, reset=reset)
        row["resets"] = int(reset.sum())
        row["reset_rel_err_o"], row["reset_rel_err_state"] = _rel(o, ref_o), _rel(s, ref_s)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def fwd_bwd(use_fla: bool) -> None:
        for x in leaves:
            x.grad = None
        o, s = fla(*leaves, log_decay, s0) if use_fla else chunk_retention(*leaves, log_decay, s0,
                                                                             chunk_size=shape.chunk)
        (o.float().square().sum() + s.float().square().sum()).backward()

    if grads and fla is not None:
        fwd_bwd(False)
        ref = [x.grad.clone() for x in leaves]
        fwd_bwd(True)
        row.update({f"rel_err_d{n}": _rel(x.grad, r) for n, x, r in zip("qkv", leaves, ref, strict=True)})

    def torch_fwd() -> Any:
        return chunk_retention(q, k, v, log_decay, s0, chunk_size=shape.chunk)

    with torch.no_grad():
        row["torch_fwd_ms"] = _ms(clock, torch_fwd, *reps)
    row["torch_fwd_bwd_ms"] = _ms(clock, lambda: fwd_bwd(False), *reps)
    if fla is not None:
        with torch.no_grad():
            row["fla_fwd_ms"] = _ms(clock, lambda: fla(q, k, v, log_decay, s0), *reps)
        row["fla_fwd_bwd_ms"] = _ms(clock, lambda: fwd_bwd(True), *reps)
        row["fla_speedup_fwd_bwd"] = round(row["torch_fwd_bwd_ms"] / row["fla_fwd_bwd_ms"], 2)


def fla_kernel() -> tuple[Any, str, bool]:
    """The fla retention kernel under test, with megaret's contract: (kernel, what it is, takes resets).

    megaret.ops.retention_fla.chunk_retention_fla (what model.retention_kernel=fla runs) where this
    checkout has it, else fla's chunk_simple_gla called the same way (scale 1, g_gamma = the decays)."""
    try:
        import fla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable: {one_line(exc)}", False
    try:
        from megaret.ops.retention_fla import chunk_retention_fla

        def wrapped(q, k, v, log_decay, s0, reset=None):  # noqa: ANN001, ANN202
            return chunk_retention_fla(q, k, v, log_decay, s0, reset=reset)

        return wrapped, f"megaret.ops.retention_fla.chunk_retention_fla on fla-core {fla.__version__}", True
    except Exception as exc:  # noqa: BLE001
        missing = one_line(exc)

    def raw(q, k, v, log_decay, s0, reset=None):  # noqa: ANN001, ANN202, ARG001
        return chunk_simple_gla(q, k, v, g_gamma=log_decay, scale=1.0, initial_state=s0,
                                output_final_state=True)

    what = f"fla-core {fla.__version__} chunk_simple_gla (megaret.ops.retention_fla unavailable: {missing})"
    return raw, what, False


def _rel(a, b) -> float:  # noqa: ANN001
    a, b = a.float(), b.float()
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).item())


def _ms(clock, fn, reps: int, warmup: int) -> float:  # noqa: ANN001
    """Median ms of fn over reps after warmup (CUDA events on a GPU)."""
    times = sorted(clock.times(fn, reps, warmup))
    return round(times[len(times) // 2] * 1e3, 3)


# ---------------------------------------------------------------------------------------------
# stages: throughput and decoding (the benchmarks, in this process)

GPU_WIDTHS = ["--hidden", "2048", "--layers", "4", "--heads", "8", "--transformer-heads", "16",
              "--vocab", "32000"]  # configs/1.3b.yaml and transformer-1.3b.yaml, 4 layers
SMOKE_WIDTHS = ["--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "256"]


def stage_throughput(smoke: bool, limit: float) -> dict:
    from bench import train_throughput

    kernel = kernel_choice(smoke)
    argv = ["--plot", "none", *(["--retention-kernel", kernel] if kernel in ("fla", "torch", "auto") else [])]
    if smoke:
        argv += [*SMOKE_WIDTHS, "--chunk", "32", "--lengths", "64", "128", "--reps", "1"]
    else:
        argv += [*GPU_WIDTHS, "--chunk", "256", "--lengths", "2048", "8192", "--tokens-per-step", "16384",
                 "--reps", "3", "--warmup", "2", "--device", "cuda", "--dtype", "bf16"]
    with contextlib.redirect_stdout(io.StringIO()):  # its JSON dump: the result is recorded below instead
        out = train_throughput.main(argv)
    import torch

    flash = torch.cuda.is_available() and torch.backends.cuda.flash_sdp_enabled()
    return {"status": "ok", "retention_kernel": kernel, "transformer_sdpa_flash_enabled": flash,
            "device": out["device"], "argv": " ".join(argv),
            "parameters": out["parameters"], "peak": out["peak"], "mfu_rule": out["mfu_rule"]["retnet"],
            "table": out["table"], "summary": out["summary"]}


def stage_decoding(smoke: bool, limit: float) -> dict:
    from bench import decoding

    argv = ["--plot", "none"]
    if smoke:
        argv += [*SMOKE_WIDTHS, "--lengths", "64", "128", "--batches", "1", "2", "--reps", "2"]
    else:
        argv += [*GPU_WIDTHS, "--lengths", "1024", "16384", "--batches", "1", "8", "--reps", "10",
                 "--warmup", "3", "--device", "cuda", "--dtype", "bf16", "--cuda-graph"]
    with contextlib.redirect_stdout(io.StringIO()):  # its JSON dump: the result is recorded below instead
        out = decoding.main(argv)
    keep = ("batch", "length", "retnet_ms", "transformer_ms", "transformer_prealloc_ms", "latency_ratio",
            "bytes_ratio", "retnet_state_mib", "transformer_state_mib",
            "retnet_graph_ms", "latency_ratio_graph")
    return {"status": "ok", "device": out["device"], "argv": " ".join(argv), "parameters": out["parameters"],
            "table": [{k: r[k] for k in keep if k in r} for r in out["table"]], "summary": out["summary"]}


def kernel_choice(smoke: bool) -> str:
    """model.retention_kernel for the RetNet runs: fla on the GPU when both the key and fla exist."""
    if retention_kernel_key() is None:
        return "unavailable: this checkout has no model.retention_kernel (the torch kernels run)"
    if smoke:
        return "torch"
    if importlib.util.find_spec("fla") is None:
        return "unavailable: fla is not installed (the torch kernels run)"
    return "fla"
