"""Checkpoints (issue 6): atomic directories with manifests, safe loading, bit-exact resume, export.

One launch of tests/distributed/checkpoint_resume.py on 2 ranks trains each layout three ways
(uninterrupted; stopped after step 6; resumed from the step-4 checkpoint to step 10), then
corrupts checkpoints and plants a code-running pickle; the tests below assert on its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from megaret.checkpoint.files import (
    LATEST,
    CheckpointError,
    list_checkpoints,
    prune,
    publish,
    recover,
    resolve,
    select_newest_valid,
    step_name,
    to_prune,
    verify,
)
from megaret.checkpoint.safe import SafeCheckpointEngine, safe_load
from tests.conftest import REPO, run_distributed

# tp,pp,zero,source[,precision]; bf16 under PP=2: fp32 gradient accumulation (DeepSpeed's
# BF16_Optimizer, its bf16_zero_pp_rank_* files) resumes bit-exactly too
SPECS = ("1,1,1,synthetic", "1,1,1,shards", "1,2,1,synthetic", "2,1,1,synthetic", "1,2,1,synthetic,bf16")


class RunsCode:
    """Unpickling this runs a shell command (creates `marker`)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------
# one process


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": RunsCode(str(marker))}, bad)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt was refused.*could run code"):
        safe_load(bad)
    with pytest.raises(CheckpointError, match="was refused"):
        SafeCheckpointEngine(types.SimpleNamespace()).load(str(bad))  # what the DeepSpeed engine calls
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_deepspeed_types_are_allowlisted(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states,
                "slices": [{"w": fragment_address(numel=4, start=0)}], "t": torch.arange(3)}, path)
    back = safe_load(path)
    assert back["zero_stage"] is ZeroStageEnum.optimizer_states and back["loss_scaler"].cur_scale == 1.0
    assert back["slices"][0]["w"].numel == 4 and torch.equal(back["t"], torch.arange(3))


def _fake_checkpoint(root, step: int, payload: bytes = b"x" * 5000):
    tmp = root / f".tmp-{step_name(step)}-1"
    (tmp / "ds").mkdir(parents=True)
    (tmp / "ds" / "mp_rank_00_model_states.pt").write_bytes(payload)
    (tmp / "rank_00000.pt").write_bytes(b"rank state")
    publish(tmp, root / step_name(step), {"trainer": {"step": step}})
    return root / step_name(step)


def test_publish_verify_and_fall_back_past_damaged_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for step in (4, 8, 12):
        _fake_checkpoint(root, step)
    assert (root / LATEST).read_text().strip() == "step_0000012"
    manifest = verify(root / "step_0000012")
    assert set(manifest["files"]) == {"ds/mp_rank_00_model_states.pt", "rank_00000.pt"}
    assert manifest["files"]["rank_00000.pt"]["size"] == len(b"rank state")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # nothing temporary left
    # bytes changed inside step 12, step 8 truncated, a partial step 16 (no manifest)
    f12 = root / "step_0000012" / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(f12.read_bytes())
    data[2000:2010] = b"0123456789"
    f12.write_bytes(bytes(data))
    os.truncate(root / "step_0000008" / "rank_00000.pt", 3)
    (root / "step_0000016").mkdir()
    sel = select_newest_valid(root)
    assert sel.path == root / "step_0000004"
    text = "\n".join(sel.messages)
    assert "step_0000016/manifest.json is missing" in text
    assert "step_0000012/ds/mp_rank_00_model_states.pt has sha256" in text
    assert "step_0000008/rank_00000.pt has 3 bytes, the manifest says 10" in text
    assert sel.messages[-1] == ("resuming from the previous checkpoint step_0000004 instead of "
                                "step_0000016, step_0000012, step_0000008")
    assert resolve(tmp_path) == root / "step_0000004"  # a run dir resolves to its newest valid one
    (root / "step_0000004" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="step_0000004/rank_00000.pt is missing"):
        verify(root / "step_0000004")
    assert select_newest_valid(root).path is None


def test_interrupted_saves_never_cost_a_published_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    _fake_checkpoint(root, 4)
    # a save that died before publishing: its temporary directory is ignored, then removed
    (root / ".tmp-step_0000008-99" / "ds").mkdir(parents=True)
    assert select_newest_valid(root).path == root / "step_0000004"
    # a save of an existing step that died after moving the old copy aside: it is put back
    os.replace(root / "step_0000004", root / ".old-step_0000004")
    done = recover(root)
    assert len(done) == 2 and verify(root / "step_0000004")
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000004"]
    # saving the same step again replaces it (the new one is in place before the old is removed)
    new = _fake_checkpoint(root, 4, payload=b"y" * 10)
    assert verify(new)["files"]["ds/mp_rank_00_model_states.pt"]["size"] == 10
    assert [p.name for _, p in list_checkpoints(root)] == ["step_0000004"]


def test_keep_policy(tmp_path):
    assert to_prune([4, 8, 12, 16, 20], keep_last=2, keep_every=None) == [4, 8, 12]
    assert to_prune([4, 8, 12, 16, 20], keep_last=2, keep_every=8) == [4, 12]
    assert to_prune([10], keep_last=1, keep_every=None) == []
    root = tmp_path / "checkpoints"
    root.mkdir()
    for step in (4, 8, 10):
        _fake_checkpoint(root, step)
    (root / "step_0000012").mkdir()  # partial, newer than the step just saved (10): left alone
    removed = prune(root, keep_last=1, keep_every=None, newest=10)
    assert [p.name for p in removed] == ["step_0000004", "step_0000008"]
    assert [p.name for _, p in list_checkpoints(root)] == ["step_0000010", "step_0000012"]


def test_carried_state_round_trips_through_weights_only(tmp_path):
    from megaret.checkpoint.legacy import unpack_carried
    from megaret.models.retnet import RetNetState
    from megaret.models.transformer import TransformerState
    from megaret.train.step import StateCarry

    state = RetNetState([torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)], position=96)
    carry = StateCarry(RetNetState)
    carry.put(0, state)
    torch.save({"carried_state": carry.state_dict()}, tmp_path / "r.pt")
    back = StateCarry(RetNetState)
    back.load_state_dict(safe_load(tmp_path / "r.pt")["carried_state"])
    assert isinstance(back.state[0], RetNetState) and back.state[0].position == 96
    assert all(torch.equal(a, b) for a, b in zip(back.state[0].layers, state.layers, strict=True))
    # format-1 checkpoints packed dataclasses by name: read without any class-name table
    legacy = {0: {"__state_type__": "RetNetState",
                  "fields": {"layers": list(state.layers), "position": 96}}}
    old = StateCarry(RetNetState)
    old.load_state_dict(unpack_carried(legacy))
    assert all(torch.equal(a, b) for a, b in zip(old.state[0].layers, state.layers, strict=True))
    with pytest.raises(ValueError, match="no layer state has the keys"):
        TransformerState.from_state_dict({"layers": [{"x": torch.zeros(1)}], "position": 0})


# ------------------------------------------------------------------------------------------
# launched


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    work = tmp_path_factory.mktemp("ckpt")
    proc = run_distributed("checkpoint_resume.py", 2, str(work), *SPECS, "corrupt", "layout", "malicious",
                           timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return types.SimpleNamespace(work=work, report=json.loads(lines[-1][len("RESULT "):]))


@pytest.mark.parametrize("spec", SPECS)
def test_resume_is_bit_exact(launched, spec):
    r = launched.report[spec]
    print(spec, {k: r[k] for k in ("resumed_from", "loss_max_abs_diff", "param_max_abs_diff", "n_tensors")})
    assert r["ref_checkpoints"] == [LATEST, "step_0000004", "step_0000008", "step_0000010"]
    assert r["run_checkpoints"] == r["ref_checkpoints"]
    assert r["first_run_equal"]  # the stopped run was the same run up to its stop
    assert r["resumed_from"] == "step_0000004" and r["resumed_step"] == 4
    assert r["resumed_params_equal_step4"]
    assert len(r["resumed_losses"]) == 6  # steps 5..10
    assert r["losses_equal"] and r["loss_max_abs_diff"] == 0.0
    assert r["params_equal"] and r["param_max_abs_diff"] == 0.0
    assert r["moved_from_step4"] > 1e-3  # the steps after the checkpoint changed the weights
    assert r["ref_losses"][-1] < r["ref_losses"][0]
    assert r["loader_state_equal"]
    assert r["loader_state_is_set"] == spec.endswith("shards")  # the shard loader's position resumed
    assert r["export_equal"]
    assert r["export_dtypes"] == ["torch.float32"]  # bf16 runs too: their fp32 masters
    assert r["export_is_not_rounded"] == spec.endswith(",bf16")  # ... not the bf16 weights cast up


def test_corrupt_checkpoints_are_detected_and_the_previous_one_is_used(launched):
    c = launched.report["corrupt"]
    ref = launched.report[SPECS[0]]["ref_losses"]
    f = c["flipped"]
    assert f["resumed_from"] == "step_0000008" and f["step"] == 8
    text = "\n".join(f["messages"])
    assert "step_0000012/manifest.json is missing" in text
    assert "step_0000010/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt has sha256" in text
    assert "resuming from the previous checkpoint step_0000008" in text
    assert f["losses_9_10"] == ref[8:10]  # and it goes on exactly as before
    assert f["resaved_step10_verifies"]
    t = c["truncated"]
    assert t["resumed_from"] == "step_0000004" and t["step"] == 4
    text = "\n".join(t["messages"])
    assert "step_0000010/ds/mp_rank_00_model_states.pt has" in text and "(truncated?)" in text
    assert "step_0000008/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt has" in text
    # each rejected checkpoint was moved to checkpoints/rejected/ (the bad step 10 twice), none deleted
    assert c["rejected"] == ["step_0000008", "step_0000010", "step_0000010.1", "step_0000012"]


def test_resume_with_another_layout_is_refused_clearly(launched):
    msg = launched.report["layout"]["refused"]
    assert msg is not None and msg.startswith("CheckpointError:"), msg
    assert "tensor: saved 2, now 1" in msg and "data: saved 1, now 2" in msg and "resharding" in msg


def test_trainer_refuses_a_code_running_checkpoint_file(launched):
    m = launched.report["malicious"]
    assert m["refused"] is not None and "mp_rank_00_model_states.pt was refused" in m["refused"], m
    assert not m["marker_created"]


def test_export_cli_gives_a_one_process_model_with_the_same_logits(launched, ctx1, tmp_path):
    from megaret.config import load_config
    from megaret.models.retnet import RetNet
    from megaret.parallel.megatron_config import megatron_config

    spec = "2,1,1,synthetic"  # TP shards gathered; the 1,2,1 export (PP stages merged) is checked in-run
    key = "tp2-pp1-zero1-synthetic"
    out = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "megaret.export", "--checkpoint",
                           str(launched.work / key / "run"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    assert json.loads((tmp_path / "model.pt.json").read_text())["step"] == 10
    exported = torch.load(out, weights_only=True)
    gathered = torch.load(launched.work / f"gathered-{key}.pt", weights_only=True)
    cfg = load_config("configs/tiny.yaml", [*launched.report[spec]["overrides"], "parallel.tensor=1"])
    config = megatron_config(cfg.model, cfg.parallel)
    torch.manual_seed(0)
    model = RetNet(cfg.model, config, ctx1.tp)
    model.load_state_dict(exported)  # strict: every name of the full model, right shapes
    live = RetNet(cfg.model, config, ctx1.tp)
    live.load_state_dict(gathered, strict=False)  # the weights gathered from the live ranks
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(cfg.model.vocab_size, (2, cfg.data.seq_length), generator=gen)
    with torch.no_grad():
        a, b = model(x).logits, live(x).logits
    assert torch.equal(a, b)
    assert all(v.dtype == torch.float32 for v in exported.values() if torch.is_tensor(v))


def test_hf_export_of_a_tensor_parallel_checkpoint(launched, ctx1, tmp_path):
    """The TP=2 run exported with `--format hf` (its weights: TP shards merged, the fp32 masters) loads
    with transformers and gives the logits and greedy tokens of megaret with the weights gathered from
    the live ranks. (The run trains a 128-id toy vocabulary; the export's tokenizer files are a tiny
    corpus's, which this check does not use.)"""
    transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
    from megaret.checkpoint.consolidate import export_weights
    from megaret.hf.write import write_hf
    from megaret.infer.decoding import generate
    from megaret.models.retnet import RetNet
    from megaret.parallel.megatron_config import megatron_config
    from tests.data_fixtures import build_tiny

    key = "tp2-pp1-zero1-synthetic"
    state, manifest, cfg = export_weights(launched.work / key / "run")
    assert manifest["model"]["tensor"] == 2
    tokenizer = build_tiny(tmp_path, name="corpus").parent / "tokenizer.json"
    tok = types.SimpleNamespace(path=tokenizer, bos_id=0, eos_id=1, vocab_size=cfg.model.vocab_size)
    out = tmp_path / "hf"
    out.mkdir()
    write_hf(out, state, cfg, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    live = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp).eval()  # one process
    live.load_state_dict(torch.load(launched.work / f"gathered-{key}.pt", weights_only=True), strict=False)
    x = torch.randint(cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(x).logits - live(x).logits).abs().max() <= 1e-5
        got = hf.generate(x[:1, :6], max_new_tokens=10, do_sample=False)
    assert torch.equal(got, generate(live, x[:1, :6], 10, greedy=True, eos_id=1))
