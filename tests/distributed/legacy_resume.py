"""Launched by tests/test_checkpoint_formats.py (1 rank): resume a format-1 checkpoint.

    legacy_resume.py FIXTURE.tar.gz WORKDIR

FIXTURE (tests/fixtures/make_format1_checkpoint.py, written by megaret a1522b7) holds a tiny
RetNet's step-3 checkpoint with a carried recurrent state (data.packing=segments) and the losses
the old code trained steps 4 and 5 to. A Trainer with the checkpoint's own config resumes it,
then trains to step 5 and saves (format 2); a second Trainer resumes that. Rank 0 prints
`RESULT {json}`.
"""

from __future__ import annotations

import gc
import json
import sys
import tarfile
from pathlib import Path

import torch
from _common import report_and_close  # tests/distributed/_common.py (the script's own folder)

from megaret.checkpoint.consolidate import consolidate
from megaret.checkpoint.files import read_manifest
from megaret.checkpoint.safe import safe_load
from megaret.config.loader import apply_overrides, config_from_dict
from megaret.train.trainer import Trainer


def trainer(run: Path, manifest: dict) -> Trainer:
    return Trainer(config_from_dict(apply_overrides(manifest["config"], [f"run.dir={run}"])))


def carried_equal(carry, packed: dict) -> bool:
    """The live carried state equals format 1's packed one ({chunk: {__state_type__, fields}})."""
    if set(carry.state) != set(packed):
        return False
    for chunk, want in packed.items():
        got = carry.state[chunk]
        if type(got).__name__ != want["__state_type__"] or got.position != want["fields"]["position"]:
            return False
        pairs = zip(got.layers, want["fields"]["layers"], strict=True)
        if not all(torch.equal(a.cpu(), b) for a, b in pairs):
            return False
    return True


def main() -> None:
    fixture, work = Path(sys.argv[1]), Path(sys.argv[2])
    with tarfile.open(fixture) as tar:
        tar.extractall(work, filter="data")
    expected = json.loads((work / "expected.json").read_text())
    run = work / "run"
    ckpt = run / "checkpoints" / "step_0000003"
    manifest = read_manifest(ckpt)
    weights = {k: v for k, v in consolidate(ckpt)[0].items() if torch.is_tensor(v)}
    packed = safe_load(ckpt / "rank_00000.pt")["carried_state"]

    t = trainer(run, manifest)
    out = {
        "saved_format": manifest["format"], "resumed_from": t.resumed_from.name, "step": t.step,
        "params_equal": t.full_parameters().keys() == weights.keys()
        and all(torch.equal(v, weights[k]) for k, v in t.full_parameters().items()),
        "carried_equal": carried_equal(t.carry, packed),
        "messages": t.checkpointer.messages,
    }
    out["losses"] = [r.loss for r in t.train()]  # steps 4, 5; saves step 5 (format 2)
    out["expected_losses"] = expected["losses_4_5"]
    final = t.full_parameters()
    t.close()
    del t
    gc.collect()

    new = run / "checkpoints" / "step_0000005"
    m2 = read_manifest(new)
    out["new_format"] = m2["format"]
    out["new_manifest_keys"] = sorted(k for k in m2 if k != "files")
    out["new_rank_parts"] = sorted(safe_load(new / "rank_00000.pt")["parts"])
    again = trainer(run, m2)
    out["again_step"] = again.step
    out["again_params_equal"] = all(torch.equal(v, final[k]) for k, v in again.full_parameters().items())
    again.close()
    exported = consolidate(new)[0]
    out["export_equal"] = all(torch.equal(exported[k], v) for k, v in final.items())
    report_and_close(out)


if __name__ == "__main__":
    sys.exit(main())
