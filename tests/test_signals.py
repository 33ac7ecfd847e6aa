"""Signals on a real trainer process (one CPU process, the tiny config, synthetic data).

One run directory goes through three launches:

1. SIGINT mid-run: the checkpoint of the current step is written, exit 130, no traceback;
2. SIGUSR1 while the run is still starting (held before resuming by the fault plan's
   sleep_before_resume_s): exit 75 with a line saying nothing was trained, nothing is saved;
3. it resumes from launch 1's checkpoint (the step counter continues; that a resume is bit-exact
   is tests/test_chaos.py's), then two SIGINTs mid-run: exit 130 at once, no new checkpoint, the
   published one untouched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from megaret.checkpoint.files import list_checkpoints
from megaret.errors import ERROR_PREFIX, EXIT_INTERRUPTED, EXIT_REQUEUE
from megaret.faults import plan_env
from tests.conftest import REPO

STEPS = 8
COMMON = ["data.source=synthetic", f"train.steps={STEPS}", "train.log_interval=1", "train.eval_steps=0",
          "logging.tensorboard=false", "checkpoint.interval=100"]


class Launch:
    """`python -m megaret.train` on the tiny config; stdout read line by line, stderr to a file."""

    def __init__(self, run_dir: Path, **faults) -> None:
        self.err_path = run_dir.parent / f"{run_dir.name}-{time.time_ns()}.err"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                   **(plan_env(**faults) if faults else {}))
        env.pop("MEGARET_DEBUG", None)
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", *COMMON,
                 f"run.dir={run_dir}"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
        self.out = ""

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.out += line
            if re.search(pattern, line):
                return
        self.proc.kill()
        raise AssertionError(f"no {pattern!r}:\n{self.out}\n{self.err_path.read_text()[-3000:]}")

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self.out += out
        return self.proc.returncode, self.out, self.err_path.read_text()


def steps_saved(run_dir: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run_dir / "checkpoints")]


def test_sigint_saves_usr1_at_start_up_leaves_it_resumes_and_a_second_sigint_stops_at_once(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()

    # 1. Ctrl-C mid-run: the current step is saved, exit 130
    a = Launch(run, sleep_each_step_s=0.3)
    a.wait_for(r"^step\s+2/")
    a.proc.send_signal(signal.SIGINT)
    rc, out, err = a.finish()
    assert rc == EXIT_INTERRUPTED, out + err
    m = re.search(r"caught SIGINT: checkpoint of step (\d+) saved .*exiting \(interrupted", out)
    assert m, out + err
    saved = int(m.group(1))
    assert 2 <= saved < STEPS and steps_saved(run) == [saved]
    assert "Traceback" not in err and ERROR_PREFIX not in err, err

    # 2. USR1 while still starting: nothing trained in this launch, nothing saved, exit 75
    b = Launch(run, sleep_before_resume_s=2)
    b.wait_for(r"sleeping 2s before resume")
    b.proc.send_signal(signal.SIGUSR1)  # its default action would end the process silently
    rc, out, err = b.finish()
    assert rc == EXIT_REQUEUE, out + err
    assert "caught SIGUSR1: nothing trained yet (still starting), nothing to save" in out, out
    assert "resumed from" not in err and "Traceback" not in err, err  # acted on before resuming
    assert steps_saved(run) == [saved]

    # 3. the run resumes where launch 1 stopped; two Ctrl-Cs mid-run then stop it at once, with
    #    no checkpoint and the published one untouched
    c = Launch(run, sleep_each_step_s=1.0)
    c.wait_for(r"^step\s+\d+/")
    assert re.search(rf"^step\s+{saved + 1}/{STEPS}\b", c.out, re.M), c.out  # the step counter continues
    c.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    t_sig = time.time()
    c.proc.send_signal(signal.SIGINT)
    rc, out, err = c.finish()
    assert rc == EXIT_INTERRUPTED, out + err
    assert time.time() - t_sig < 10
    assert "megaret: interrupted: second Ctrl-C: stopped at once without saving" in err, err
    assert f"resumed from {run / 'checkpoints' / f'step_{saved:07d}'}" in err, err
    assert "Traceback" not in err and "caught SIGINT" not in out, out + err
    assert steps_saved(run) == [saved] and (run / "checkpoints" / "latest").read_text().strip().endswith(
        f"{saved:07d}")
    print(f"signals: SIGINT saved step {saved}, then start-up USR1 and resume + double SIGINT: "
          f"{time.time() - t0:.0f}s")
