"""Context parallelism (parallel.context_parallel): RetNet's retention and the attention archs'
Ulysses attention over a sequence split across CP ranks equal one process; the trainer at
CP x TP / PP / DP(ZeRO-1) equals CP=1; CP checkpoints resume at other CP sizes. Three launches
(imports cost ~15 s per rank): the models (RetNet, the Transformer, the sliding-window arch) at
CP=2, CP=4 and CP=2 x TP=2 (logits, per-token loss, final state and every gradient, with document
starts and a carried state); the fla kernel at CP=2 under Triton's interpreter; the trainer.
"""

from __future__ import annotations

import json

import pytest

from megaret.ops.retention_fla import fla_available
from tests.conftest import run_distributed

MODEL_TOL = 1e-5  # fp32, max-abs relative (measured <= 1.2e-6)
# trainer runs, as tests/test_train.py: loss and whole-model parameters 1e-5; the worst single
# tensor is looser (Adam turns rounding noise of near-zero gradients into O(lr) updates)
LOSS_TOL, PARAM_TOL, PARAM_MAX_TOL = 1e-5, 1e-5, 1e-3


def _result(proc) -> dict:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    print(json.dumps(results, indent=1))
    return results


def _check_model(results: dict) -> None:
    for key, r in results.items():
        for name in ("logits_rel", "loss_rel", "grad_rel_max", "state_rel"):
            assert r[name] <= MODEL_TOL, (key, name, r)
        assert r["position_ok"], key


@pytest.mark.multiproc
def test_models_under_context_parallel_equal_one_process():
    archs = "--archs=retnet,transformer,sliding"
    results = _result(run_distributed("cp_parity.py", 4, archs, "2,1", "4,1", "2,2"))
    layouts = ((2, 1), (4, 1), (2, 2))
    cases = {"": ("plain", "resets", "state"), "transformer/": ("plain", "resets"),
             "sliding/": ("plain", "resets", "state")}
    assert set(results) == {f"{arch}cp{c}tp{t}/{case}" for arch, arch_cases in cases.items()
                            for c, t in layouts for case in arch_cases} | {"parallel/cp2"}
    _check_model(results)


@pytest.mark.multiproc
@pytest.mark.kernels
def test_retnet_context_parallel_on_the_fla_kernel():
    if not fla_available():
        pytest.skip("needs fla-core and triton: pip install -e '.[kernels]'")
    results = _result(run_distributed("cp_parity.py", 2, "--fla", "2,1"))
    assert set(results) == {f"fla/cp2tp1/{case}" for case in ("plain", "resets", "state")}
    _check_model(results)


@pytest.mark.multiproc
def test_trainer_context_parallel_layouts_and_resume(tmp_path):
    results = _result(run_distributed("cp_train.py", 4, str(tmp_path)))
    assert set(results) == {"cp4", "cp2tp2", "cp2pp2", "cp2dp2", "transformer/cp2pp2", "transformer/cp2dp2",
                            "resume_cp2_to_cp2", "resume_cp2_to_cp1", "resume_cp2_to_cp4",
                            "retnet/docs/cp2dp2", "sliding/docs/cp2dp2"}
    for key, r in results.items():
        assert r["loss_rel"] <= LOSS_TOL, (key, r)
        assert r["param_rel_norm"] <= PARAM_TOL, (key, r)
        assert r["param_rel_max"] <= PARAM_MAX_TOL, (key, r)
    assert results["resume_cp2_to_cp2"]["param_rel_norm"] == 0.0  # same layout: bit-exact
