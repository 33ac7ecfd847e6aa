"""bf16 training accumulates its gradients in fp32 (issue 13, item 4): one launch of
tests/distributed/bf16_accumulation.py on 2 ranks, PP=1 x DP=2 (ZeRO-1 and ZeRO-0) and PP=2."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_distributed

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    proc = run_distributed("bf16_accumulation.py", 2, str(tmp_path_factory.mktemp("bf16acc")))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("layout", ["pp1_dp2", "pp2", "zero0"])
def test_the_optimizer_steps_from_the_fp32_sum_of_the_bf16_micro_gradients(report, layout):
    r = report[layout]
    print(layout, r)
    assert r["optimizer"] == "BF16_Optimizer"
    assert r["param_dtypes"] == ["torch.bfloat16"] and r["hp_grad_dtypes"] == ["torch.float32"]
    assert r["micro_batches_seen"] == [4]  # every parameter got 4 micro-gradients
    assert r["lp_grads_freed"]  # each bf16 .grad was freed once added in (megatron's main_grad pattern)
    # the fp32 sum, reduced over DP in fp32: only fp32 rounding away from the exact sum
    assert r["fp32_accumulation_rel"] < 1e-6
    # the negative control: accumulating the same micro-gradients in bf16 is measurably worse
    assert r["bf16_accumulation_rel"] > 20 * max(r["fp32_accumulation_rel"], 1e-8)
