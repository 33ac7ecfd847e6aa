"""bench/gpu_check.sh cannot rot without a GPU: its --cpu-smoke mode runs every stage at toy size on
the CPU (the same code paths, the same JSON), and the device command in its header stays valid."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.conftest import REPO

STAGES = ["install", "train", "imports", "decoding", "retention", "throughput", "pytest"]


def test_cpu_smoke_runs_every_stage_into_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-smoke" and data["order"] == STAGES and data["total_seconds"] > 0
    status = {name: r["status"] for name, r in data["stages"].items()}
    assert status["install"] == "skipped"  # the smoke uses this environment's packages
    assert status["retention"] in ("ok", "unavailable")  # fla's kernels need CUDA
    assert all(status[s] == "ok" for s in ("imports", "throughput", "decoding", "train", "pytest")), status
    s = data["stages"]
    assert s["retention"]["T256"]["torch_fwd_bwd_ms"] > 0  # the torch side is measured anyway
    train = s["train"]
    assert (train["backend"], train["cpu_adapters"], train["device"]) == ("gloo", "on", "cpu")
    assert train["steps"] == 6
    assert train["losses"][-1] < train["losses"][0] and train["skipped"] == 0
    assert train["mfu_rule"].startswith("MFU rule: 3 x (weights ")
    assert s["throughput"]["summary"]["param_ratio"] == 1.0
    assert {r["length"] for r in s["decoding"]["table"]} == {64, 128}
    assert s["pytest"]["skipped"] >= 3 and "tests/test_gpu_smoke.py" in s["pytest"]["files"]
    # name=value lines: every stage's status, then the closing block
    lines = proc.stdout.splitlines()
    for stage in STAGES:
        assert f"{stage}.status={status[stage]}" in lines
        assert any(ln.startswith(f"check.{stage}={status[stage]}") for ln in lines)
    assert any(ln.startswith("check.result=ok") for ln in lines)


def test_a_stage_past_its_limit_is_recorded_as_timeout(tmp_path, monkeypatch):
    from bench import gpu_check

    monkeypatch.setitem(gpu_check.LIMITS, "train", 3)  # the trainer needs longer than that to start
    out = tmp_path / "gpu_check.json"
    gpu_check.run_stages(["train", "pytest"], out, smoke=True, budget=8)
    stages = json.loads(out.read_text())["stages"]
    assert stages["train"]["status"] == "timeout" and stages["train"]["seconds"] < 6
    assert stages["pytest"]["status"] == "skipped"  # what is left of the process's budget is too little


def test_the_header_holds_the_device_command():
    header = (REPO / "bench" / "gpu_check.sh").read_text().split("set -uo pipefail")[0]
    command = re.search(r"command:\s+(.+)", header).group(1).strip()
    carry = json.loads(re.search(r"carry:\s+(\[.*\])", header).group(1))
    timeout_s = int(re.search(r"timeout_s:\s+(\d+)", header).group(1))
    assert command == "bash bench/gpu_check.sh" and len(command) <= 2000
    assert carry == [".gpu_wheels"] and 300 < timeout_s <= 600
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu_wheels/x.whl"], cwd=REPO)
    assert ignored.returncode == 0  # the wheels travel only as carried, never as tracked files


def test_the_wheel_list_has_one_version_of_each_and_no_triton():
    script = (REPO / "bench" / "gpu_wheels.sh").read_text()
    pins = re.findall(r'^\s+"([A-Za-z0-9_.-]+)==([^"]+)"', script, re.M)
    names = [re.sub(r"[-_.]+", "-", n).lower() for n, _ in pins]
    assert len(names) == len(set(names))
    assert {"megatron-core", "fla-core", "pydantic", "webdataset"} <= set(names)
    assert not {"triton", "torch"} & set(names)  # the machine's own serve
    megatron = dict(zip(names, (v for _, v in pins), strict=True))["megatron-core"]
    assert megatron.startswith("0.16.")  # pyproject pins >=0.16,<0.17
    assert 'DEEPSPEED="deepspeed==0.19.8"' in script


def test_the_fla_branch_of_the_retention_stage_runs_with_a_stand_in_kernel():
    """What the GPU runs with fla's kernel, here with megaret's own op in its place (bf16 on the CPU):
    every comparison and timing key comes out, and the errors are the bf16 rounding."""
    import torch

    from bench import gpu_stages
    from bench.device import Clock
    from megaret.ops import chunk_retention

    def stand_in(q, k, v, log_decay, s0, reset=None):
        return chunk_retention(q, k, v, log_decay, s0, chunk_size=16, reset=reset)

    shape = gpu_stages.RetentionShape(heads=4, local=2, dk=16, dv=32, chunk=32)
    cpu = torch.device("cpu")
    row: dict = {}
    gpu_stages._retention_row(row, 64, 2, shape, torch.bfloat16, cpu, stand_in, Clock(cpu), grads=True,
                              resets=True, reps=(1, 1))
    assert {"rank0_rel_err_o", "rank1_rel_err_state", "rel_err_dq", "reset_rel_err_o", "fla_fwd_bwd_ms",
            "torch_fwd_ms", "fla_speedup_fwd_bwd"} <= set(row) and row["resets"] >= 1
    assert max(v for k, v in row.items() if "rel_err" in k) < 2e-2


def test_the_step_line_parser_reads_the_trainers_gpu_line():
    from bench import gpu_check

    line = ("step      2/6 | loss 9.8123 | lr 1.000e-03 | grad norm 3.210 | 123,456 tok/s | 251 TFLOP/s | "
            "MFU 25.4% | mem 20,480 MiB | skipped 0 | ETA 0:00:01")
    m = gpu_check.STEP.match(line)
    assert m is not None and m.groups() == ("2", "6", "9.8123", "123,456", "251", "25.4", "0")
