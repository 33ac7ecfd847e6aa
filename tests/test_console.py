"""What a run tells the user (the console and TensorBoard): the start banner, a line per checkpoint,
the end summary with the next commands, console lines that are means over the log interval, and
TensorBoard's config text, hparams, tokens seen, step time and by-tokens run, with no doubled
points after a resume (two real tiny runs, the second resuming from an earlier checkpoint after
the first logged past it). Also: progress lines without a terminal, third-party chatter kept off
stdout.
"""

from __future__ import annotations

import io
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megaret.progress import Progress
from megaret.train.chatter import quiet_third_party
from megaret.train.metrics import SCALARS, Metrics
from megaret.train.step import StepResult
from megaret.train.tb import flat_hparams
from tests.conftest import REPO

TOKENS_PER_STEP = 4 * 64  # configs/tiny.yaml: global batch 4 x seq_length 64
LINE = re.compile(r"^step\s+(\d+)/\d+ \| loss (\S+) \|.*\| grad norm (\S+) \| ([\d,]+) tok/s", re.M)


# ------------------------------------------------------------------------------------------
# in process


def test_console_line_is_the_mean_of_the_steps_since_the_previous_line(capsys):
    m = Metrics("unused", writer_rank=True, tensorboard=False, log_interval=3, tokens_per_step=100)
    steps = [(1, 5.0, 2.0, 100.0, False), (2, 4.0, 1.0, 200.0, False), (3, 3.0, 3.0, 50.0, False),
             (4, float("nan"), float("nan"), 100.0, True), (5, 2.0, 1.0, 100.0, False),
             (6, 1.0, 2.0, 25.0, False)]  # fmt: skip
    for step, loss, norm, tok_s, skipped in steps:
        m.log(step, StepResult(loss, norm, 1e-3, skipped), tok_s, int(skipped), 7, step_time=1.0)
    lines = {int(s): (float(loss), float(norm), float(rate.replace(",", "")))
             for s, loss, norm, rate in LINE.findall(capsys.readouterr().out)}
    assert sorted(lines) == [1, 3, 4, 6]  # this run's first step, every 3rd, the skipped one
    assert lines[1] == (5.0, 2.0, 100.0)
    # steps 2-3: mean loss and grad norm; tokens over seconds (100 tokens in 1/2 + 2 s)
    assert lines[3] == pytest.approx((3.5, 2.0, 200 / (100 / 200 + 100 / 50)), abs=1e-3)
    assert math.isnan(lines[4][0])  # the window held only the skipped step
    assert lines[6] == pytest.approx((1.5, 1.5, 200 / (100 / 100 + 100 / 25)), abs=1e-3)
    assert m.last_line == {"loss": 1.5, "steps": 2, "tokens_per_s": pytest.approx(40.0)}


def test_progress_without_a_terminal_is_one_final_line(monkeypatch):
    monkeypatch.delenv("MEGARET_PROGRESS", raising=False)
    err = io.StringIO()  # not a TTY: no bar
    monkeypatch.setattr(sys, "stderr", err)
    with Progress("evaluating valid", total=3, unit="doc") as p:
        for _ in range(3):
            p.update()
        p.close("3 documents, 120 tokens scored")
    assert re.fullmatch(r"evaluating valid: 3 documents, 120 tokens scored in \d+\.\d s\n", err.getvalue())

    err.truncate(0), err.seek(0)
    monkeypatch.setenv("MEGARET_PROGRESS", "1")  # forced on: a tqdm bar, then the same final line
    with Progress("building", total=4, unit="doc") as p:
        p.update(4)
    out = err.getvalue()
    assert "building:   0%|" in out and "\r" in out  # the bar, drawn in place
    assert out.rstrip("\n").splitlines()[-1].split("\r")[-1].startswith("building: 4 doc in ")


def test_quiet_third_party_drops_chatter_and_keeps_errors(capfd):
    ds = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler(sys.stdout)  # what DeepSpeed installs at import
    ds.addHandler(handler)
    try:
        with quiet_third_party():
            ds.warning("Setting accelerator to CPU.")
            logging.getLogger("megatron.core").info("chatter")
            ds.error("a real failure")
        out, err = capfd.readouterr()
        assert out == "" and "Setting accelerator" not in err and "chatter" not in err
        assert "DeepSpeed: ERROR: a real failure" in err
        ds.warning("after the context")  # everything restored
        assert "after the context" in capfd.readouterr().out
    finally:
        ds.removeHandler(handler)


def test_flat_hparams_take_every_config_field():
    from megaret.config import load_config

    cfg = load_config("configs/tiny.yaml").to_dict()
    hp = flat_hparams(cfg)
    assert hp["model.arch"] == "retnet" and hp["train.steps"] == 20 and hp["optimizer.betas"] == "[0.9, 0.98]"
    assert hp["checkpoint.load"] == "null" and hp["launch.extra_sbatch"] == "{}"
    assert len(hp) == sum(len(section) for section in cfg.values())
    assert all(isinstance(v, bool | int | float | str) for v in hp.values())


# ------------------------------------------------------------------------------------------
# two real runs: the second resumes from an earlier checkpoint than the first reached


def _train(run: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", "data.source=synthetic",
         "train.steps=6", "train.log_interval=2", "checkpoint.interval=3", "train.eval_interval=3",
         "train.eval_steps=1", f"run.dir={run}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Run 1 trains steps 1-6 (checkpoints 3 and 6); its step-6 checkpoint is then corrupted, so
    run 2 resumes from step 3 and trains 4-6 again: the points run 1 logged for 4-6 are stale."""
    run = tmp_path_factory.mktemp("console") / "run"
    first = _train(run)
    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    rank_file = run / "checkpoints" / "step_0000006" / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    second = _train(run)
    return run, first, second, files


def _accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_banner_checkpoint_lines_and_end_summary(resumed):
    run, first, second, _ = resumed
    for out in (first, second):
        assert "megaret: training retnet, 164 K parameters (164,480: 2 layers" in out, out
        assert "parallel: world 1 = TP 1 x PP 1 x DP 1" in out and "MFU rule: " in out
        assert f"batch: 4 sequences x 64 tokens = {TOKENS_PER_STEP} tokens per step" in out
        assert "data: synthetic bigram task" in out and f"run.dir: {run} (" in out
        assert "next:" in out and f"python -m megaret.generate --checkpoint {run} " in out
        assert f"python -m megaret.evaluate --checkpoint {run}" in out
        assert f"python -m megaret.export --checkpoint {run} --out {run / 'model.pt'}" in out
        assert f"tensorboard --logdir {run / 'tensorboard'}" in out
    ckpt = run / "checkpoints"
    assert "start: fresh, step 0 of 6" in first
    saved = re.findall(r"^checkpoint saved: step (\d) -> (\S+) \(\d+\.\d [KM]iB, \d+\.\d+ s\)$", first, re.M)
    assert saved == [("3", str(ckpt / "step_0000003")), ("6", str(ckpt / "step_0000006"))]
    assert re.search(r"^done: steps 1-6 of 6 in 0:\d\d:\d\d \(1,536 tokens this run, 1,536 in all\) \| "
                     r"loss \d\.\d{4} \(mean of the last 2 step\(s\)\) \| eval loss \d\.\d{4}$", first, re.M)
    assert f"last checkpoint: {ckpt / 'step_0000006'}" in first
    assert f"start: resumed from {ckpt / 'step_0000003'} at step 3 of 6" in second
    assert re.findall(r"^checkpoint saved: step (\d)", second, re.M) == ["6"]
    assert "done: steps 4-6 of 6 in " in second and "(768 tokens this run, 1,536 in all)" in second
    assert second.index("start: resumed") < second.index("step      4/6")  # the banner comes first


def test_console_lines_are_means_of_the_tensorboard_steps(resumed):
    _, first, second, run1_files = resumed
    acc = _accumulator(run1_files[0])  # run 1's own event file: its steps 1-6
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    rate = {e.step: e.value for e in acc.Scalars("train/tokens_per_s")}
    lines = {int(s): (float(v), float(r.replace(",", ""))) for s, v, _, r in LINE.findall(first)}
    assert sorted(lines) == [1, 2, 4, 6]
    for step, window in ((1, [1]), (2, [2]), (4, [3, 4]), (6, [5, 6])):
        printed_loss, printed_rate = lines[step]
        assert printed_loss == pytest.approx(sum(loss[s] for s in window) / len(window), abs=6e-5), step
        harmonic = len(window) / sum(1 / rate[s] for s in window)
        assert printed_rate == pytest.approx(harmonic, abs=0.6), step
    assert [int(s) for s, *_ in LINE.findall(second)] == [4, 6]  # the resumed run's first step, then 6


def test_tensorboard_config_hparams_tokens_step_time_and_no_doubled_points(resumed):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, *_ = resumed
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one file per run, read together as TensorBoard reads them
    acc = _accumulator(run / "tensorboard")
    scalars = acc.Tags()["scalars"]
    assert {f"train/{s}" for s in SCALARS} | {"eval/loss", "eval/ppl"} <= set(scalars)
    for tag in scalars:  # no step twice: run 1's points after step 3 are replaced, not doubled
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == ([3, 6] if tag.startswith("eval/") else [1, 2, 3, 4, 5, 6]), tag
    second = _accumulator(events[1])
    for tag in ("train/loss", "train/step_time_s", "eval/loss"):  # steps 4-6 are the resumed run's
        later = {e.step: (e.wall_time, e.value) for e in second.Scalars(tag)}
        assert {e.step: (e.wall_time, e.value) for e in acc.Scalars(tag) if e.step > 3} == later, tag
    seen = [(e.step, e.value) for e in acc.Scalars("train/tokens_seen")]
    assert seen == [(s, s * TOKENS_PER_STEP) for s in range(1, 7)]
    rates = {e.step: e.value for e in acc.Scalars("train/tokens_per_s")}
    for e in acc.Scalars("train/step_time_s"):
        assert e.value > 0 and e.value * rates[e.step] == pytest.approx(TOKENS_PER_STEP, rel=1e-5)
    assert all(e.value >= 0 for e in acc.Scalars("train/data_time_s"))

    # the resolved config, as text and hparams, at the first step each run trained
    texts = acc.Tensors("config/text_summary")
    assert [t.step for t in texts] == [1, 4]
    assert "    train:\n" in texts[-1].tensor_proto.string_val[0].decode() and "steps: 6" in \
        texts[-1].tensor_proto.string_val[0].decode()
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = info.session_start_info.hparams
    assert hp["model.arch"].string_value == "retnet" and hp["train.steps"].number_value == 6
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} == {"train/loss", "eval/loss"}

    # the by-tokens run: the loss against the tokens seen, also without doubled points
    tokens = _accumulator(run / "tensorboard" / "by_tokens")
    tps = TOKENS_PER_STEP
    assert [e.step for e in tokens.Scalars("by_tokens/train_loss")] == [s * tps for s in range(1, 7)]
    assert [e.step for e in tokens.Scalars("by_tokens/eval_loss")] == [3 * tps, 6 * tps]
    by_step = {e.step * TOKENS_PER_STEP: e.value for e in acc.Scalars("train/loss")}
    assert {e.step: e.value for e in tokens.Scalars("by_tokens/train_loss")} == by_step
