"""Each megatron-core CPU adapter is still needed upstream, and works.

If a test in the first group fails after a megatron-core upgrade, upstream no longer does
what the adapter works around: re-check the adapter and remove it if it is dead.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megaret.parallel import cpu_adapters

# The adapters apply to CPU ranks (ctx1 is a gloo world on the CPU also on a GPU machine); on a CUDA
# device they are off (tests/test_gpu_ready.py).


def _source(module: str) -> str:
    return inspect.getsource(importlib.import_module(module))


# --- upstream still needs each adapter ------------------------------------------------

def test_megatron_version_is_the_one_the_adapters_target():
    from megatron.core import package_info

    assert package_info.__version__.startswith("0.16."), package_info.__version__


@pytest.mark.parametrize("module", [
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.p2p_communication",
])
def test_upstream_uses_cuda_current_device_as_a_device(module):
    assert "device=torch.cuda.current_device()" in _source(module)


def test_upstream_synchronizes_cuda_in_p2p():
    assert "torch.cuda.synchronize()" in _source("megatron.core.pipeline_parallel.p2p_communication")


def test_upstream_schedules_hardcode_cuda_tensors():
    assert _source("megatron.core.pipeline_parallel.schedules").count('device="cuda"') >= 3


def test_upstream_rng_tracker_uses_cuda_generators():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    assert "torch.cuda.get_rng_state()" in inspect.getsource(random.CudaRNGStatesTracker.add)
    assert "torch.cuda" in inspect.getsource(random.CudaRNGStatesTracker.fork) + _source(random.__name__)


def test_without_adapters_megatron_fails_on_cpu():
    """A fresh interpreter without the adapters cannot build a gathering TP layer on CPU."""
    code = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")
        from megatron.core.pipeline_parallel import schedules
        try:
            schedules.torch.zeros([], dtype=torch.int, device="cuda")
        except (RuntimeError, AssertionError) as e:
            print("FAILS:", type(e).__name__)
        from megatron.core.tensor_parallel import random
        try:
            random.get_cuda_rng_tracker().add("x", 1)
        except (RuntimeError, AssertionError) as e:
            print("FAILS:", type(e).__name__)
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # CPU ranks, also on a GPU machine
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.count("FAILS:") == 2, out.stdout + out.stderr


# --- each adapter works --------------------------------------------------------------

def test_adapters_apply_and_map_cuda_to_cpu(ctx1):
    assert cpu_adapters.apply_cpu_adapters(torch.device("cpu")) is True
    for name in cpu_adapters.PATCHED_MODULES:
        module = importlib.import_module(name)
        assert module.torch.cuda.current_device() == "cpu", name
        module.torch.cuda.synchronize()  # a no-op instead of an error
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is the real torch
    assert torch.cuda.current_device is not cpu_adapters._CudaOnCpu.current_device  # torch itself untouched


def test_cpu_rng_tracker_forks_reproducibly(ctx1):
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    cpu_adapters.seed_tensor_parallel_rng(42, tp_rank=1)
    tracker = random.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_adapters.CpuRNGStatesTracker)
    outer_before = torch.get_rng_state()
    saved = tracker.get_states()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the caller's stream is untouched
    tracker.set_states(saved)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(a, b)  # replay (what recomputation does) is exact
    with tracker.fork():
        c = torch.rand(4)
    assert not torch.equal(b, c)  # the forked stream advances
    cpu_adapters.seed_tensor_parallel_rng(42, tp_rank=0)
    with random.get_cuda_rng_tracker().fork():
        d = torch.rand(4)
    assert not torch.equal(a, d)  # TP ranks draw different dropout masks


def test_recompute_with_dropout_reproduces_gradients(ctx1):
    """megatron's checkpoint utility saves/restores RNG through the CPU adapters."""
    from megatron.core.tensor_parallel.random import checkpoint

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    cpu_adapters.seed_tensor_parallel_rng(3, tp_rank=0)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)

    def block(inp):
        with random.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(lin(inp), p=0.5, training=True).tanh()

    states = random.get_cuda_rng_tracker().get_states()
    cpu = torch.get_rng_state()
    block(x).sum().backward()
    g_ref, x_ref = lin.weight.grad.clone(), x.grad.clone()
    lin.weight.grad = None
    x.grad = None
    random.get_cuda_rng_tracker().set_states(states)
    torch.set_rng_state(cpu)
    checkpoint(block, False, x).sum().backward()
    assert torch.equal(lin.weight.grad, g_ref)
    assert torch.equal(x.grad, x_ref)


def test_dropout_seeds_differ_per_dp_rank_and_stage():
    """The dropout rule's seeds (megaret/models/dropout.py): one per (DP rank, stage), and the
    TP streams (+ 2718 + tp_rank) of one slot never meet another slot's default stream."""
    from megaret.parallel.context import dropout_seed_offset

    pp_size, tp_size = 4, 8
    offsets = [dropout_seed_offset(d, p, pp_size) for d in range(16) for p in range(pp_size)]
    assert len(set(offsets)) == len(offsets) and dropout_seed_offset(0, 0, pp_size) == 0
    tp_streams = {o + 2718 + t for o in offsets for t in range(tp_size)}
    assert len(tp_streams) == len(offsets) * tp_size and not tp_streams & set(offsets)
