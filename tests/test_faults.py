"""The test-only fault plan (megaret/faults.py): parsed once, strict, inert without a plan."""

from __future__ import annotations

import json

import pytest

from megaret import faults


@pytest.fixture
def plan(monkeypatch):
    """Set MEGARET_FAULT_PLAN for this test (the cached plan is re-read); record sleeps and exits."""
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(faults.time, "sleep", lambda s: calls.append(("sleep", s)))

    def fake_exit(code: int) -> None:
        calls.append(("exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(faults.os, "_exit", fake_exit)

    def use(**kwargs) -> list[tuple[str, float]]:
        if kwargs:
            monkeypatch.setenv(faults.PLAN_ENV, faults.plan_env(**kwargs)[faults.PLAN_ENV])
        else:
            monkeypatch.delenv(faults.PLAN_ENV, raising=False)
        faults.active_plan.cache_clear()
        return calls

    yield use
    faults.active_plan.cache_clear()


def test_without_a_plan_points_do_nothing(plan):
    calls = plan()
    faults.point("before_step", rank=0, step=1)
    faults.point("before_publish")
    assert faults.active_plan() is None and calls == []


def test_sleep_stall_and_exit_act_at_their_points(plan, capsys):
    calls = plan(sleep_each_step_s=0.5, stall={"rank": 1, "step": 3, "seconds": 900})
    faults.point("before_step", rank=0, step=3)
    faults.point("before_step", rank=1, step=2)
    faults.point("before_publish")  # exit_before_publish is off
    assert calls == [("sleep", 0.5), ("sleep", 0.5)]
    faults.point("before_step", rank=1, step=3)
    assert calls[2:] == [("sleep", 0.5), ("sleep", 900.0)]
    assert "rank 1: stalling 900s before step 3" in capsys.readouterr().out

    calls = plan(exit_before_publish=True)
    faults.point("before_step", rank=0, step=1)
    with pytest.raises(SystemExit):
        faults.point("before_publish")
    assert calls[-1] == ("exit", faults.FAULT_EXIT) and faults.FAULT_EXIT == 86

    calls = plan(sleep_before_resume_s=2)
    faults.point("before_step", rank=0, step=1)
    faults.point("before_resume", rank=0)
    assert calls[-1] == ("sleep", 2.0) and "rank 0: sleeping 2s before resume" in capsys.readouterr().out


def test_the_plan_is_read_once(plan, monkeypatch):
    plan(sleep_each_step_s=1)
    first = faults.active_plan()
    monkeypatch.setenv(faults.PLAN_ENV, "not json")  # a change after start-up is not seen
    assert faults.active_plan() is first


@pytest.mark.parametrize("raw, match", [
    ("not json", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"sleep_each_step": 1}', "unknown key"),
    ('{"sleep_each_step_s": "0.5"}', "must be a number"),
    ('{"stall": {"rank": 1, "step": 3}}', "stall must be"),
    ('{"stall": {"rank": "1", "step": 3, "seconds": 1}}', "must be integers"),
    ('{"exit_before_publish": 1}', "true or false"),
])
def test_a_bad_plan_is_refused_with_the_reason(plan, monkeypatch, raw, match):
    plan()
    monkeypatch.setenv(faults.PLAN_ENV, raw)
    with pytest.raises(faults.FaultPlanError, match=match):
        faults.point("before_step", rank=0, step=1)


def test_plan_env_checks_and_round_trips():
    env = faults.plan_env(stall={"rank": 0, "step": 2, "seconds": 1.5})
    assert json.loads(env[faults.PLAN_ENV]) == {"stall": {"rank": 0, "step": 2, "seconds": 1.5}}
    with pytest.raises(faults.FaultPlanError, match="unknown key"):
        faults.plan_env(exit_before_rename=True)
