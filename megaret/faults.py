"""Fault injection for tests: one plan, named by one environment variable, read once.

Production code marks the few places where a test may make a run misbehave with
``faults.point(name, ...)``. Without a plan (always, outside tests) a point is one cached
lookup and a return. A test sets ``MEGARET_FAULT_PLAN`` to a JSON object whose keys (all
optional) say what happens at which point::

    MEGARET_FAULT_PLAN='{"sleep_each_step_s": 0.25,
                         "stall": {"rank": 1, "step": 3, "seconds": 900},
                         "exit_before_publish": true,
                         "sleep_before_resume_s": 5}'

- ``sleep_each_step_s`` (point ``before_step``): sleep that long before every training step, so a
  tiny run lasts long enough to be signalled or killed mid-way.
- ``stall`` (point ``before_step``): rank ``rank`` sleeps ``seconds`` before step ``step`` and
  prints ``rank R: stalling Ss before step N``: a stalled collective for its peers.
- ``exit_before_publish`` (point ``before_publish``): end the process with ``os._exit(86)``
  (:data:`FAULT_EXIT`) once a checkpoint's files and manifest are written, before the rename
  that publishes it.
- ``sleep_before_resume_s`` (point ``before_resume``, in the trainer's start-up after the model,
  the data and run.dir are ready): print ``rank R: sleeping Ss before resume`` and sleep, so a
  test can signal a run that is still starting.

:func:`plan_env` builds the variable from keyword arguments (and checks them). The plan is
parsed on first use and cached for the life of the process; an unknown key or a value of the
wrong type raises :class:`FaultPlanError` there, so a typo never silently disables a fault.
Never set the variable in production.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from megaret.errors import UserError

log = logging.getLogger("megaret.faults")

PLAN_ENV = "MEGARET_FAULT_PLAN"
FAULT_EXIT = 86  # the status of an `exit_before_publish` fault
POINTS = ("before_step", "before_publish", "before_resume")


class FaultPlanError(UserError, ValueError):
    """MEGARET_FAULT_PLAN is not a valid plan (one-line message)."""


@dataclass(frozen=True)
class Stall:
    rank: int
    step: int
    seconds: float


@dataclass(frozen=True)
class FaultPlan:
    sleep_each_step_s: float = 0.0
    stall: Stall | None = None
    exit_before_publish: bool = False
    sleep_before_resume_s: float = 0.0

    @classmethod
    def from_dict(cls, raw: Any) -> FaultPlan:
        if not isinstance(raw, dict):
            raise FaultPlanError(f"{PLAN_ENV} must be a JSON object, got {raw!r}")
        unknown = set(raw) - {"sleep_each_step_s", "stall", "exit_before_publish", "sleep_before_resume_s"}
        if unknown:
            raise FaultPlanError(f"{PLAN_ENV}: unknown key(s) {sorted(unknown)}; see megaret/faults.py")
        sleep = _number(raw.get("sleep_each_step_s", 0.0), "sleep_each_step_s")
        stall = raw.get("stall")
        if stall is not None:
            if not isinstance(stall, dict) or set(stall) != {"rank", "step", "seconds"}:
                raise FaultPlanError(f"{PLAN_ENV}: stall must be {{rank, step, seconds}}, got {stall!r}")
            if not all(type(stall[k]) is int for k in ("rank", "step")):
                raise FaultPlanError(f"{PLAN_ENV}: stall rank and step must be integers, got {stall!r}")
            stall = Stall(stall["rank"], stall["step"], _number(stall["seconds"], "stall.seconds"))
        exit_before_publish = raw.get("exit_before_publish", False)
        if not isinstance(exit_before_publish, bool):
            raise FaultPlanError(f"{PLAN_ENV}: exit_before_publish must be true or false")
        return cls(sleep, stall, exit_before_publish,
                   _number(raw.get("sleep_before_resume_s", 0.0), "sleep_before_resume_s"))

    def at(self, name: str, rank: int | None, step: int | None) -> None:
        """Act out this plan's faults for point `name`."""
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}; one of {', '.join(POINTS)}")
        if name == "before_step":
            if self.sleep_each_step_s:
                time.sleep(self.sleep_each_step_s)
            s = self.stall
            if s is not None and s.rank == rank and s.step == step:
                print(f"rank {rank}: stalling {s.seconds:g}s before step {step} ({PLAN_ENV})", flush=True)
                time.sleep(s.seconds)
        elif name == "before_resume" and self.sleep_before_resume_s:
            print(f"rank {rank}: sleeping {self.sleep_before_resume_s:g}s before resume ({PLAN_ENV})",
                  flush=True)
            time.sleep(self.sleep_before_resume_s)
        elif name == "before_publish" and self.exit_before_publish:
            print(f"exiting with {FAULT_EXIT} before publishing a checkpoint ({PLAN_ENV})", flush=True)
            os._exit(FAULT_EXIT)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise FaultPlanError(f"{PLAN_ENV}: {key} must be a number >= 0, got {value!r}")
    return float(value)


@functools.cache
def active_plan() -> FaultPlan | None:
    """The plan in MEGARET_FAULT_PLAN (None when unset or empty); read once per process."""
    text = os.environ.get(PLAN_ENV, "").strip()
    if not text:
        return None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise FaultPlanError(f"{PLAN_ENV} is not valid JSON ({exc}): {text!r}") from exc
    plan = FaultPlan.from_dict(raw)
    log.warning("fault injection is on (%s=%s)", PLAN_ENV, text)
    return plan


def point(name: str, *, rank: int | None = None, step: int | None = None) -> None:
    """A place where a test's fault plan may act (see the module docstring); a no-op without one."""
    plan = active_plan()
    if plan is not None:
        plan.at(name, rank, step)


def plan_env(**faults: Any) -> dict[str, str]:
    """{MEGARET_FAULT_PLAN: json} for a child process's environment; raises on an invalid plan."""
    plan = FaultPlan.from_dict(faults)
    raw = {k: v for k, v in asdict(plan).items() if k in faults}
    return {PLAN_ENV: json.dumps(raw, separators=(",", ":"))}
