"""What makes the code GPU-safe without a GPU to test on: parallel.backend resolution and device
choice, the CPU adapters keyed to the device, the launch environment, the MFU peak by card, and
the trainer's timed step leaving the batch fetch out."""

from __future__ import annotations

import importlib
import os
import time
import types

import pytest
import torch

from megaret.config import ConfigError, load_config
from megaret.parallel import context
from megaret.parallel.context import BackendError, rank_device, resolve_backend
from megaret.parallel.cpu_adapters import (
    CpuRNGStatesTracker,
    apply_cpu_adapters,
    cpu_adapters_active,
    seed_tensor_parallel_rng,
)
from megaret.parallel.launch_env import set_cuda_launch_env
from megaret.train.metrics import CARD_PEAK_TFLOPS, card_of, card_peak, mfu_rule

GIB = 2**30


# --- parallel.backend -----------------------------------------------------------------------

def test_backend_key_defaults_to_auto_and_refuses_others():
    assert load_config("configs/tiny.yaml").parallel.backend == "auto"
    assert load_config("configs/tiny.yaml", ["parallel.backend=gloo"]).parallel.backend == "gloo"
    with pytest.raises(ConfigError, match="parallel.backend"):
        load_config("configs/tiny.yaml", ["parallel.backend=mpi"])


def test_resolve_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "gloo"
    assert resolve_backend("gloo") == "gloo"
    with pytest.raises(BackendError, match="parallel.backend=nccl needs a CUDA device") as err:
        resolve_backend("nccl")
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto") == "nccl"
    assert resolve_backend("gloo") == "gloo"  # CPU ranks on a GPU machine (the multi-rank tests)


def test_rank_device_wraps_local_rank_over_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("gloo", 3) == torch.device("cpu")
    assert [rank_device("nccl", r) for r in range(4)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]


def test_nccl_init_binds_the_device_first(monkeypatch):
    """Under nccl: CUDA_DEVICE_MAX_CONNECTIONS, then set_device, then init_process_group(device_id=...)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(context.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(context.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert context.init_distributed("auto") == torch.device("cuda", 0)
    assert calls[0] == ("set_device", torch.device("cuda", 0))
    assert calls[1][0] == "init" and calls[1][1]["backend"] == "nccl"
    assert calls[1][1]["device_id"] == torch.device("cuda", 0)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_cuda_launch_env_keeps_what_the_launcher_set():
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    set_cuda_launch_env(env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    env = {}
    set_cuda_launch_env(env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def test_sbatch_template_sets_cuda_device_max_connections():
    from tests.conftest import REPO

    assert "export CUDA_DEVICE_MAX_CONNECTIONS=" in (REPO / "slurm" / "train.sbatch").read_text()


# --- the CPU adapters follow the device -----------------------------------------------------

def test_cpu_adapters_are_off_on_a_cuda_device_and_back_on_the_cpu(ctx1):
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    assert apply_cpu_adapters(torch.device("cpu")) is True and cpu_adapters_active()
    try:
        assert apply_cpu_adapters(torch.device("cuda", 0)) is False
        assert not cpu_adapters_active()
        assert layers.torch is torch  # megatron's own torch again
        assert not isinstance(random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker)
    finally:
        assert apply_cpu_adapters(torch.device("cpu")) is True
        seed_tensor_parallel_rng(1234, 0)  # as ctx1 left it
    assert layers.torch is not torch and isinstance(random.get_cuda_rng_tracker(), CpuRNGStatesTracker)


# --- MFU: the card's peak and the counting rule ---------------------------------------------

@pytest.mark.parametrize(("name", "memory_gib", "card"), [
    ("NVIDIA H100 80GB HBM3", 79.6, "H100 SXM"),
    ("NVIDIA H100 PCIe", 79.6, "H100 PCIe"),
    ("NVIDIA H100 NVL", 93.1, "H100 NVL"),
    ("NVIDIA H100", 93.1, "H100 NVL"),  # a bare name: told by its 94 GB
    ("NVIDIA H100", 79.6, "H100 SXM"),
    ("NVIDIA H200", 140.4, "H200"),
    ("NVIDIA H200 NVL", 140.4, "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100"),
    ("NVIDIA GeForce RTX 4090", 23.6, None),
])
def test_card_of_tells_hopper_variants_apart(name, memory_gib, card):
    assert card_of(name, int(memory_gib * GIB)) == card


def test_card_peaks_are_the_dense_bf16_figures():
    assert CARD_PEAK_TFLOPS["H100 SXM"] == CARD_PEAK_TFLOPS["H200"] == 989.4
    assert CARD_PEAK_TFLOPS["H100 PCIe"] == 756.5 and CARD_PEAK_TFLOPS["H100 NVL"] == 835.5
    peak = card_peak("NVIDIA H100 80GB HBM3", 81559 * 2**20)
    assert peak is not None and peak.tflops == 989.4
    assert peak.describe() == "989.4 TFLOP/s bf16 dense (H100 SXM: NVIDIA H100 80GB HBM3, 79.6 GiB)"


def test_mfu_rule_names_the_spec_count_and_the_peak():
    m = load_config("configs/tiny.yaml").model
    rule = mfu_rule(m, 64, card_peak("NVIDIA H200", 140 * GIB), devices=8)
    assert rule.startswith("MFU rule: 3 x (weights ") and "megaret/models/spec.py" in rule
    assert "peak 989.4 TFLOP/s bf16 dense (H200: NVIDIA H200, 140.0 GiB) x 8 device(s)" in rule
    assert "MFU not logged" in mfu_rule(m, 64, None)


# --- the timed step leaves the batch fetch out ----------------------------------------------

def test_train_step_times_the_step_without_the_batch_fetch(monkeypatch):
    from megaret.train import trainer as trainer_module
    from megaret.train.batches import SyntheticBatches
    from megaret.train.step import StepResult

    cfg = load_config("configs/tiny.yaml", ["data.source=synthetic", "train.eval_steps=0"])
    fetch_s, step_s = 0.6, 0.05

    class SlowBatches(SyntheticBatches):
        def next_batch(self, step):
            time.sleep(fetch_s)
            return super().next_batch(step)

    def fake_step(*args, **kwargs):
        time.sleep(step_s)
        return StepResult(loss=1.0, grad_norm=1.0, lr=1e-3, skipped=False)

    logged = {}
    monkeypatch.setattr(trainer_module, "train_step", fake_step)
    t = trainer_module.Trainer.__new__(trainer_module.Trainer)
    t.cfg, t.step, t.skipped_steps, t.consecutive_skips, t.carry = cfg, 0, 0, 0, None
    t._eval_source = None  # evaluation off
    t.ctx = types.SimpleNamespace(device=torch.device("cpu"), rank=0)
    t.engine = t.stages = None
    t.batches = SlowBatches(cfg.model.vocab_size, cfg.data.seq_length, cfg.train.global_batch_size, 1, 0, 0)
    t.metrics = types.SimpleNamespace(log=lambda step, result, tok_s, skipped, total, step_time:
                                      logged.update(tok_s=tok_s, step_time=step_time))
    t.train_step()
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    assert tokens / logged["tok_s"] < fetch_s  # the timed part is the step alone
    assert logged["step_time"] >= fetch_s + step_s  # the ETA still counts the fetch
