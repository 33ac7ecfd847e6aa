"""Checkpoint formats: 2 (one state per part, megaret.checkpoint.manager) is written; 1 (before the
stateful parts, tests/fixtures/format1_checkpoint.tar.gz, made by megaret a1522b7) still
resumes; a newer one is refused in one line, naming the fix."""

from __future__ import annotations

import json
import tarfile
import types

import pytest

from megaret.checkpoint.files import (
    FORMAT_VERSION,
    FormatError,
    publish,
    select_newest_valid,
    step_name,
    verify,
)
from megaret.errors import EXIT_USER
from tests.conftest import REPO, run_distributed

FIXTURE = REPO / "tests" / "fixtures" / "format1_checkpoint.tar.gz"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    work = tmp_path_factory.mktemp("legacy")
    proc = run_distributed("legacy_resume.py", 1, str(FIXTURE), str(work))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return types.SimpleNamespace(work=work, report=json.loads(lines[-1][len("RESULT "):]))


def test_format1_checkpoint_resumes_weights_carried_state_and_trajectory(legacy):
    r = legacy.report
    print(json.dumps({k: r[k] for k in ("losses", "expected_losses", "messages")}, indent=1))
    assert r["saved_format"] == 1 and r["resumed_from"] == "step_0000003" and r["step"] == 3
    assert r["params_equal"]  # the weights equal the fixture's consolidated ones
    assert r["carried_equal"]  # the carried RetNet state (data.packing=segments) came back
    # saved with separate retention q/k/v/g projections: converted to the fused qkvg_proj on load
    assert any(m.startswith("converted ") and "fused into qkvg_proj" in m for m in r["messages"])
    # steps 4 and 5 go on as the old code went on (same weights, moments, RNG and carried state)
    assert r["losses"] == pytest.approx(r["expected_losses"], rel=1e-5, abs=0)


def test_the_resumed_legacy_run_saves_format2_that_resumes(legacy):
    r = legacy.report
    assert r["new_format"] == FORMAT_VERSION == 2
    assert r["new_manifest_keys"] == ["config", "format", "identity", "model", "ranks", "schedule", "step",
                                      "trainer"]
    assert r["new_rank_parts"] == ["carry", "data", "rng"]
    assert r["again_step"] == 5 and r["again_params_equal"] and r["export_equal"]


def test_format1_fixture_consolidates_offline(tmp_path):
    from megaret.checkpoint.consolidate import consolidate

    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    state, manifest = consolidate(tmp_path / "run")
    assert manifest["format"] == 1 and manifest["trainer"]["step"] == 3
    assert state["embedding.weight"].shape == (128, 32)


def test_a_newer_format_is_refused_in_one_line_and_never_skipped(tmp_path, capsys):
    from megaret.export import main as export_main

    root = tmp_path / "checkpoints"
    root.mkdir()
    for step, fmt in ((4, FORMAT_VERSION), (8, FORMAT_VERSION + 1)):
        tmp = root / f".tmp-{step_name(step)}"
        tmp.mkdir()
        (tmp / "rank_00000.pt").write_bytes(b"rank state")
        publish(tmp, root / step_name(step), {"format": fmt, "trainer": {"step": step}})
    want = f"format {FORMAT_VERSION + 1}, newer than this megaret reads.*upgrade megaret"
    with pytest.raises(FormatError, match=want):
        verify(root / step_name(8))
    with pytest.raises(FormatError, match=want):  # no fall back to step 4: it would overwrite step 8
        select_newest_valid(root)
    with pytest.raises(SystemExit) as exit_:
        export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.pt")])
    assert exit_.value.code == EXIT_USER
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upgrade megaret" in err, err
