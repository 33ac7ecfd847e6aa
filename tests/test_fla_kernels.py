"""model.retention_kernel: the chunk form on flash-linear-attention's Triton kernel equals megaret's
torch chunk form (megaret/ops/retention_fla.py).

Tests marked `kernels` run the real Triton kernels in a process of their own (tests/kernels/
ops_parity.py; the model at TP=1 and TP=2: tests/test_tp_parity.py's 2-rank launch): on a CPU
under Triton's interpreter (tests/kernels_adapters.py, installed there before triton is
imported, so nothing in this process changes), with CUDA the compiled kernels. They skip when
fla-core or triton is missing (`pip install -e '.[kernels]'`), which MEGARET_STRICT_SKIPS=1 turns
into a failure. The other tests here need neither.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from megaret.config import load_config
from megaret.config.schema import ConfigError
from megaret.ops import chunk_retention, retention_fla, retnet_log_decay
from megaret.ops.retention_fla import _segments, check_kernel, chunk_retention_fla, fla_available, uses_fla
from tests.conftest import REPO

needs_kernels = pytest.mark.skipif(not fla_available(), reason="needs fla-core and triton: "
                                   "pip install -e '.[kernels]'")
CHECKS = ["tp1of2/state", "tp3of4/state", "tp3of4/state/resets", "tp1of2/resets"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def result(stdout: str) -> dict:
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# the real kernels (own process)


@pytest.fixture(scope="module")
def ops_parity() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests/kernels/ops_parity.py")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, f"ops_parity.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    report = result(proc.stdout)
    print(json.dumps(report, indent=1))
    return report


@pytest.mark.kernels
@needs_kernels
@pytest.mark.parametrize("check", CHECKS)
def test_fla_chunk_form_matches_torch(ops_parity, check):
    """Output, final state and the gradients of q, k, v (and the initial state) for the decays of TP
    rank 1 of 2 and rank 3 of 4, T = 100 (not a multiple of fla's 64), document resets."""
    tol = 1e-5 if ops_parity["interpreted"] else 1e-2  # compiled kernels multiply fp32 in tf32
    errors = {k: v for k, v in ops_parity[check].items() if k != "fla_s"}
    assert {"o", "state", "dq", "dk", "dv"} <= errors.keys()
    assert ("ds0" in errors) == ("state" in check.split("/")[1:])
    assert max(errors.values()) <= tol, (check, errors)


@pytest.mark.kernels
@needs_kernels
def test_fla_own_chunk_retention_is_wrong_on_tp_ranks(ops_parity):
    """Negative control: fla.ops.retention.chunk_retention takes its decays from the local head
    count, so on TP rank 1 of 2 it computes another model."""
    assert ops_parity["control/fla_chunk_retention_tp1of2"]["o"] > 0.05


@pytest.mark.gpu
@needs_kernels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fla_chunk_form_matches_torch_at_real_sizes_on_cuda():
    b, t, h, dk, dv = 2, 1000, 4, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(b, t, h, dk, device="cuda", generator=g) * dk**-0.5 for _ in range(2))
    v = torch.randn(b, t, h, dv, device="cuda", generator=g)
    s0 = torch.randn(b, h, dk, dv, device="cuda", generator=g) * 0.1
    reset = torch.rand(b, t, device="cuda", generator=g) < 0.003
    lg = retnet_log_decay(2 * h, head_offset=h, num_local_heads=h).cuda()  # TP rank 1 of 2

    q, k, v = (x.bfloat16() for x in (q, k, v))  # training's dtype (fp32 on CUDA runs the torch form)

    def run(form, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [s0.clone().requires_grad_()]
        o, s = form(*leaves[:3], lg, leaves[3], reset=reset)
        (o.float().square().sum() + s.square().sum()).backward()
        return [o, s] + [x.grad for x in leaves]

    def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    got, ref = run(chunk_retention_fla, torch.bfloat16), run(chunk_retention, torch.float32)
    errors = [norm_rel(a, b) for a, b in zip(got, ref, strict=True)]
    assert max(errors[:2]) < 2e-2 and max(errors[2:]) < 3e-2, errors  # bf16 inputs, fp32 states


# ---------------------------------------------------------------------------------------------
# choosing the kernel and preparing its arguments (no fla needed)


def test_retention_kernel_is_a_checked_choice():
    assert load_config("configs/tiny.yaml").model.retention_kernel == "auto"
    cfg = load_config("configs/tiny.yaml", ["model.retention_kernel=torch"])
    assert cfg.model.retention_kernel == "torch"
    with pytest.raises(ConfigError, match=r"^model\.retention_kernel: 'cuda' is not one of auto, torch, fla"):
        load_config("configs/tiny.yaml", ["model.retention_kernel=cuda"])


def test_fla_without_fla_installed_is_refused_when_the_model_is_built(monkeypatch, ctx1):
    from megaret.models.retnet import RetNet
    from megaret.parallel.megatron_config import megatron_config

    monkeypatch.setattr(retention_fla, "fla_available", lambda: False)
    cfg = load_config("configs/tiny.yaml", ["model.retention_kernel=fla"])
    with pytest.raises(ConfigError, match=r"^model\.retention_kernel=fla but .*; pip install .*=torch$"):
        RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
    check_kernel("torch")
    check_kernel("auto")


def test_auto_is_fla_on_cuda_when_installed(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # only the device type is read
    for installed in (True, False):
        monkeypatch.setattr(retention_fla, "fla_available", lambda installed=installed: installed)
        assert uses_fla("auto", cuda) is installed
        assert not uses_fla("auto", cpu) and not uses_fla("torch", cuda)
        assert uses_fla("fla", cpu)


def test_fp64_runs_the_torch_chunk_form_with_the_reason_logged_once(caplog):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 9, 2, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 9, 2, 6, generator=g, dtype=torch.float64)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[1, 4] = True
    lg = retnet_log_decay(2)
    retention_fla._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="megaret.ops"):
        for _ in range(2):
            o, s = chunk_retention_fla(q, k, v, lg.double(), chunk_size=4, reset=reset)
    ref_o, ref_s = chunk_retention(q, k, v, lg.double(), chunk_size=4, reset=reset)
    assert torch.equal(o, ref_o) and torch.equal(s, ref_s)
    assert [r.getMessage() for r in caplog.records] == [
        "model.retention_kernel=fla cannot take fp64 inputs (fla's kernels compute in fp32 at most); "
        "the torch chunk form runs instead"]


def test_resets_become_variable_length_sequences():
    """A sequence starts at every sample start and every reset; a sample's carried state enters its
    first sequence unless the sample starts with a reset (index B: zeros); its final state is its
    last sequence's."""
    reset = torch.zeros(3, 5, dtype=torch.bool)
    reset[0, 2] = True
    reset[1, 0] = True
    reset[2, [1, 4]] = True
    cu_seqlens, source, last = _segments(reset)
    assert cu_seqlens.tolist() == [0, 2, 5, 10, 11, 14, 15]
    assert source.tolist() == [0, 3, 3, 2, 3, 3]
    assert last.tolist() == [1, 2, 5]
