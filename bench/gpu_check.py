"""The driver of the five-minute GPU check's stages; bench/gpu_check.sh runs it (read its header
first). The in-process measurement stages live in bench/gpu_stages.py; the trainer and pytest
stages, which run as child processes, here.

    python bench/gpu_check.py --json FILE [--smoke] [--budget S] STAGE [STAGE ...]
    python bench/gpu_check.py --json FILE --record STAGE --status STATUS [--note TEXT] [--if-absent]
    python bench/gpu_check.py --json FILE --summary [--total-seconds S]    (exit 1 if a stage failed)

Stages, in the order the shell runs them (most valuable figures first):
  train       `python -m megaret.train`: 6 bf16 steps of the 1.3B-width RetNet, 4 layers, synthetic
              data: loss falls, no step skipped, backend nccl, CPU adapters off
  imports     versions, the card and its bf16 peak, every import the project needs, one fla kernel call
  decoding    bench/decoding.py: per-token latency of RetNet and the Transformer at 1k and 16k, batch 1 and 8
  retention   fla's chunk_simple_gla vs megaret's chunk_retention at Dk 256, Dv 512 in bf16, T 2048
              and 16384, with the decays of TP ranks 0 and 1 of 8 heads: relative errors and timings
  throughput  bench/train_throughput.py: RetNet (fla) vs Transformer (SDPA) at the 1.3B widths, 4
              layers, T 2048 and 8192, tokens/s and MFU
  pytest      `pytest -m gpu` over the test files that hold GPU tests (with the launched GPU smoke)

Each stage ends with its result merged into FILE (one JSON object, rewritten whole and atomically
after every stage, so a run cut off at any point leaves valid JSON with every finished stage) and
`stage.key=value` lines on stdout. A stage's status: ok | fail | timeout | killed | unavailable
(something it needs is absent: it says what) | skipped. Each stage has a time limit (LIMITS,
bounded by --budget, the seconds this process may use); the shell's `timeout` kills a process that
overruns and records `killed` with --record. `--smoke` runs every stage at toy size on the CPU
(tests/test_gpu_check.py), so the script cannot rot without a GPU to run it on.

This module imports only the standard library at the top: the shell's --record calls and the
subprocess stages (train, pytest) start in milliseconds.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_stages import (  # noqa: E402
    kernel_choice,
    one_line,
    stage_decoding,
    stage_imports,
    stage_retention,
    stage_throughput,
)

#: seconds each stage may take on the GPU machine (the whole check has 5 minutes)
LIMITS: dict[str, int] = {"imports": 50, "retention": 45, "throughput": 55, "decoding": 40, "train": 150,
                          "pytest": 90}
LIMITS.update({k: int(v) for k, v in json.loads(os.environ.get("GPU_CHECK_LIMITS", "{}")).items()})
STATUSES = ("ok", "fail", "timeout", "killed", "unavailable", "skipped")
class StageTimeout(Exception):
    """A stage ran past its limit (raised by SIGALRM inside in-process stages)."""


# ---------------------------------------------------------------------------------------------
# the JSON file


def record(path: Path, stage: str, result: dict[str, Any], smoke: bool | None = None) -> None:
    """Merge one stage's result into the JSON at `path` (atomic rewrite) and print its name=value lines."""
    data: dict[str, Any] = {"check": "megaret bench/gpu_check", "stages": {}, "order": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:  # never expected (atomic writes), but a report must still come out
            data["corrupt_previous"] = path.read_text()[-2000:]
    data.setdefault("started", _now())
    if smoke is not None:
        data["mode"] = "cpu-smoke" if smoke else "gpu"
    data["stages"][stage] = result
    if stage not in data["order"]:
        data["order"].append(stage)
    data["updated"] = _now()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    for key, value in _pairs(result):
        print(f"{stage}.{key}={value}", flush=True)


def summarize(path: Path, total_seconds: float | None) -> int:
    """Print `check.<stage>=<status>` per stage (and the total); 1 if any failed, timed out or was killed."""
    data = json.loads(path.read_text()) if path.exists() else {"stages": {}, "order": []}
    if total_seconds is not None:
        data["total_seconds"] = round(total_seconds, 1)
        data["finished"] = _now()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    bad = []
    for stage in data["order"]:
        r = data["stages"][stage]
        extra = f" ({r['seconds']} s)" if "seconds" in r else ""
        why = r.get("error") or r.get("note") or ""
        print(f"check.{stage}={r['status']}{extra}{' ' + json.dumps(why) if why else ''}")
        if r["status"] in ("fail", "timeout", "killed"):
            bad.append(stage)
    if total_seconds is not None:
        print(f"check.total_seconds={total_seconds:.0f}")
    print(f"check.result={'FAIL: ' + ','.join(bad) if bad else 'ok'} json={path}", flush=True)
    return 1 if bad else 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _pairs(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The scalars of a result (and of its `summary`), formatted for name=value lines (a string with
    spaces is JSON-quoted, so every line splits at its first '=')."""
    out = []
    for key, value in [*result.items(), *result.get("summary", {}).items()]:
        if isinstance(value, float):
            out.append((key, f"{value:.4g}"))
        elif isinstance(value, str):
            out.append((key, json.dumps(value) if re.search(r"\s", value) or not value else value))
        elif isinstance(value, bool | int) or value is None:
            out.append((key, str(value)))
    return out


# ---------------------------------------------------------------------------------------------
# running stages


def run_stages(stages: list[str], path: Path, smoke: bool, budget: float) -> None:
    """Run each stage in turn with its limit (bounded by what is left of `budget`), recording each."""
    deadline = time.monotonic() + budget
    for stage in stages:
        left = deadline - time.monotonic()
        if left < 5:
            note = f"no time left in this process's {budget:.0f} s"
            record(path, stage, {"status": "skipped", "note": note}, smoke)
            continue
        limit = min(LIMITS[stage], left)
        t0 = time.monotonic()
        partial: dict[str, Any] = {}  # what a stage that supports it has measured so far
        try:
            result = _with_alarm(limit, lambda stage=stage, limit=limit, partial=partial: _call(
                STAGES[stage], smoke, limit, partial))
        except StageTimeout:
            result = {**partial, "status": "timeout", "limit_s": round(limit, 1)}
        except Exception as exc:  # noqa: BLE001 - a failing stage is recorded; the next one runs
            result = {**partial, "status": "fail", "error": one_line(exc)}
        result["seconds"] = round(time.monotonic() - t0, 2)
        record(path, stage, result, smoke)
        _release_gpu_memory()


def _call(fn: Callable[..., dict], smoke: bool, limit: float, partial: dict[str, Any]) -> dict:
    """A stage that takes `partial` fills it as it goes, so a timeout still records what it measured."""
    if "partial" in inspect.signature(fn).parameters:
        return fn(smoke, limit, partial=partial)
    return fn(smoke, limit)


def _with_alarm(seconds: float, fn: Callable[[], dict]) -> dict:
    def raise_timeout(signum, frame):  # noqa: ANN001, ARG001
        raise StageTimeout

    previous = signal.signal(signal.SIGALRM, raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _release_gpu_memory() -> None:
    if "torch" in sys.modules:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# stages in subprocesses: train and pytest

STEP = re.compile(r"^step\s+(\d+)/\s*(\d+) \| loss (\S+) \|.*\| ([\d,.]+) tok/s \| (\S+) TFLOP/s"
                  r"(?: \| MFU ([\d.]+)%)?.*\| skipped (\d+)")


def stage_train(smoke: bool, limit: float) -> dict:
    run_dir = _scratch(16 * 2**30) / f"megaret_gpu_check_{os.getpid()}"  # the final checkpoint: ~5 GB
    common = ["data.source=synthetic", "train.steps=6", "train.log_interval=1", "train.eval_steps=0",
              "logging.tensorboard=false", "checkpoint.resume=false", "checkpoint.interval=1000000",
              "optimizer.warmup_steps=1", "model.dropout=0.0", f"run.dir={run_dir}"]
    if smoke:
        config, extra = "configs/tiny.yaml", ["train.precision=bf16"]
    else:  # the 1.3B widths (hidden 2048, 8 heads, FFN 4096, vocab 32000), 4 layers
        config, extra = "configs/1.3b.yaml", ["model.num_layers=4", "data.seq_length=2048",
                                              "train.micro_batch_size=8", "train.global_batch_size=16",
                                              "optimizer.lr=1.0e-3", "train.precision=bf16"]
    kernel = kernel_choice(smoke)
    if kernel in ("fla", "torch"):
        extra.append(f"model.retention_kernel={kernel}")
    cmd = [sys.executable, "-m", "megaret.train", "--config", config, *common, *extra]
    rc, out = _stream(cmd, limit - 3)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "rc": rc, "retention_kernel": kernel}
    parallel = next((ln for ln in out if ln.startswith("parallel: ")), "")
    result["parallel"] = parallel
    result["mfu_rule"] = next((ln for ln in out if ln.startswith("MFU rule: ")), None)
    m = re.search(r"backend (\S+) \| device (\S+) \| CPU adapters (on|off)", parallel)
    backend, device, adapters = m.groups() if m else (None, None, None)
    result.update(backend=backend, device=device, cpu_adapters=adapters)
    steps = [STEP.match(ln).groups() for ln in out if STEP.match(ln)]
    losses = [float(s[2]) for s in steps]
    result.update(steps=len(steps), losses=losses, tokens_per_s=[float(s[3].replace(",", "")) for s in steps],
                  tflops=[float(s[4]) for s in steps], skipped=int(steps[-1][6]) if steps else None,
                  mfu=[float(s[5]) / 100 if s[5] else None for s in steps])
    if len(steps) > 1:  # the first step compiles kernels and warms the allocator: the rest are the rate
        result["tokens_per_s_after_first"] = round(_median(result["tokens_per_s"][1:]), 1)
        mfus = [x for x in result["mfu"][1:] if x is not None]
        result["mfu_after_first"] = round(_median(mfus), 4) if mfus else None
    want = ("gloo", "on", "cpu") if smoke else ("nccl", "off", "cuda")
    problems = []
    if rc != 0:
        problems.append("timeout" if rc == 124 else f"exit {rc}: {out[-1] if out else ''}")
    if len(steps) != 6:
        problems.append(f"{len(steps)} of 6 steps logged")
    if losses and not (all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]):
        problems.append(f"loss did not fall: {losses}")
    if result["skipped"]:
        problems.append(f"{result['skipped']} steps skipped")
    if (backend, adapters) != want[:2] or not (device or "").startswith(want[2]):
        problems.append(f"want backend {want[0]}, CPU adapters {want[1]}, device {want[2]}: {parallel!r}")
    result["status"] = "timeout" if rc == 124 else ("fail" if problems else "ok")
    if problems:
        result["error"] = "; ".join(problems)[:500]
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def stage_pytest(smoke: bool, limit: float) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "@pytest.mark.gpu" in p.read_text() and p.name != "test_gpu_check.py")
    if os.environ.get("GPU_CHECK_PYTEST"):  # a chosen subset, e.g. the newest GPU tests on a short lease
        files = os.environ["GPU_CHECK_PYTEST"].split()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
    rc, out = _stream(cmd, limit - 3)
    summary = next((ln for ln in reversed(out) if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary)}
    result: dict[str, Any] = {"files": ",".join(files), "rc": rc, "summary_line": summary.strip("= "),
                              **counts}
    if rc == 124:
        result["status"] = "timeout"
    elif rc != 0:
        result["status"], result["error"] = "fail", summary.strip("= ") or (out[-1] if out else f"exit {rc}")
    else:  # on the GPU machine nothing may skip; on the CPU every GPU test skips
        result["status"] = "ok" if smoke or not counts.get("skipped") else "fail"
        if result["status"] == "fail":
            result["error"] = f"{counts['skipped']} GPU tests skipped on the GPU machine (see the log)"
    return result


def _stream(cmd: list[str], timeout: float) -> tuple[int, list[str]]:
    """Run cmd in REPO, echoing its output as it comes; (exit code or 124 on timeout, output lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + max(timeout, 1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        return proc.wait(timeout=max(deadline - time.monotonic(), 1)), lines
    except (subprocess.TimeoutExpired, StageTimeout):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124, lines


def _scratch(need_bytes: int) -> Path:
    """/dev/shm when it is writable and has room (memory is faster than the disk), else the temp dir."""
    import tempfile

    shm = Path("/dev/shm")
    if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= need_bytes:
        return shm
    return Path(tempfile.gettempdir())


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


STAGES: dict[str, Callable[[bool, float], dict]] = {
    "imports": stage_imports, "retention": stage_retention, "throughput": stage_throughput,
    "decoding": stage_decoding, "train": stage_train, "pytest": stage_pytest,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", metavar="STAGE", help=", ".join(STAGES))
    ap.add_argument("--json", required=True, type=Path, help="the results file (created or merged into)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (tests/test_gpu_check.py)")
    ap.add_argument("--budget", type=float, default=sum(LIMITS.values()), help="seconds for all the stages")
    ap.add_argument("--record", metavar="STAGE", help="record STAGE's --status and --note, run nothing")
    ap.add_argument("--status", choices=STATUSES)
    ap.add_argument("--note", default="")
    ap.add_argument("--if-absent", action="store_true", help="with --record: only if STAGE has no result yet")
    ap.add_argument("--summary", action="store_true", help="print one line per stage; exit 1 if any failed")
    ap.add_argument("--total-seconds", type=float, default=None, help="with --summary: the check's wall time")
    args = ap.parse_args(argv)
    if args.summary:
        return summarize(args.json, args.total_seconds)
    if args.record:
        done = json.loads(args.json.read_text())["stages"] if args.json.exists() else {}
        if args.if_absent and args.record in done:
            return 0
        if args.status is None:
            ap.error("--record needs --status")
        result: dict[str, Any] = {"status": args.status}
        if args.note:
            result["note"] = args.note
        record(args.json, args.record, result, args.smoke)
        return 0
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        ap.error(f"stages: {' '.join(unknown) or 'none given'}; choose from {', '.join(STAGES)}")
    run_stages(args.stages, args.json, args.smoke, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
