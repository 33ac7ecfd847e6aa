"""One table of exit codes, one line per user error: the pieces, in this process (no launches).

The launches that exercise them end to end are in tests/test_train_cli.py (a bad key, a world the
layout does not divide, run.dir not writable, third-party chatter) and tests/test_signals.py.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import warnings

import pytest

from megaret import errors
from megaret.entry import run_entry
from megaret.errors import UserError
from tests.conftest import REPO


def table_rows(text: str) -> list[tuple[int, str]]:
    rows = re.findall(r"^\|\s*(\d+)\s*\|(.*)\|\s*$", text, re.M)
    return [(int(code), meaning.strip()) for code, meaning in rows]


def test_readme_exit_code_table_is_the_one_in_megaret_errors():
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- exit-codes:", 1)[1].split("\n\n", 1)[0]  # the table under the marker
    rows = table_rows(section)
    constants = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert [code for code, _ in rows] == sorted(constants) == [0, 1, 2, 75, 76, 130]
    doc = [(c, m.replace("``", "`")) for c, m in table_rows(errors.__doc__)]
    assert rows == doc, "README's exit-code table differs from megaret/errors.py's docstring"


def test_run_entry_user_error_is_one_line_and_ctrl_c_is_130(capsys, monkeypatch):
    monkeypatch.delenv("MEGARET_DEBUG", raising=False)

    def fails():
        raise UserError("the thing is wrong;\n  set thing=right")

    with pytest.raises(SystemExit) as exit_:
        run_entry(fails)
    assert exit_.value.code == errors.EXIT_USER
    assert capsys.readouterr().err == "megaret: error: the thing is wrong; set thing=right\n"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_entry(interrupted)
    assert exit_.value.code == errors.EXIT_INTERRUPTED and capsys.readouterr().err == "megaret: interrupted\n"


def test_a_reader_leaving_stdout_ends_quietly_and_other_broken_pipes_stay_errors():
    """`python -m megaret.train --print-config | head -1`: no traceback, status 0. A BrokenPipeError
    from any other pipe (a socket, a child's stdin) is not mistaken for it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "megaret.train", "--print-config"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader leaves before the listing is written (it is still importing)
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""

    read, write = os.pipe()
    os.close(read)

    def other_pipe():
        os.write(write, b"x")

    with pytest.raises(BrokenPipeError):
        run_entry(other_pipe)
    os.close(write)


def test_training_error_is_a_user_error():
    from megaret.train.trainer import TrainingError

    assert issubclass(TrainingError, UserError)


def test_agree_or_raise_in_a_world_of_one(ctx1):
    from megaret.parallel.agree import agree_or_raise

    def fails():
        raise UserError("nope")

    assert agree_or_raise(ctx1, lambda: 7) == 7
    with pytest.raises(UserError, match="nope"):
        agree_or_raise(ctx1, fails, everywhere=True)


def test_stop_signals_record_and_a_second_ctrl_c_stops_at_once():
    from megaret.train.signals import Preempted, StopNow, StopSignals

    before = signal.getsignal(signal.SIGINT)
    stop = StopSignals()
    with stop, stop:  # re-entrant: the entry point enters it, then Trainer.train
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a warning signal outranks SIGTERM
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C outranks both
        assert stop.received == signal.SIGINT
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert Preempted(signal.SIGINT, 3).code == 130 and Preempted(signal.SIGUSR2, 3).code == 75


def test_job_exit_status_is_the_tasks_own(tmp_path):
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from megaret.launch import slurm

    class Job:
        job_id, state = "17", "FAILED"
        paths = type("Paths", (), {"stderr": tmp_path / "17_0_log.err"})

        def __init__(self, error=None):
            self.error = error

        def results(self):
            if self.error:
                raise self.error
            return [0]

    trace = f"Traceback ...\nmegaret.launch.slurm.TaskFailed: {slurm.TaskFailed(2, 'megaret.train', 0)}\n"
    assert slurm.job_exit_status(Job()) == (0, "job 17 completed")
    status, line = slurm.job_exit_status(Job(FailedJobError(trace)))
    assert status == 2 and "python -m megaret.train exited with status 2 (task 0)" in line
    assert slurm.job_exit_status(Job(FailedJobError("Traceback ...\nValueError: bug\n")))[0] == 1
    assert slurm.job_exit_status(Job(UncompletedJobError("no result")))[0] == 1


def test_third_party_records_wait_for_the_run_log_and_ours_stay(tmp_path, monkeypatch, capsys):
    from megaret.train.chatter import ThirdPartyLog

    monkeypatch.delenv("MEGARET_DEBUG", raising=False)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(str(a[0])))
    with ThirdPartyLog() as chatter:
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
        logging.getLogger("megatron.core.foo").warning("megatron says hi")
        warnings.warn_explicit("async grad allreduce", UserWarning, "/site-packages/megatron/x.py", 1)
        warnings.warn_explicit("skipping shard", UserWarning, str(REPO / "megaret/data/x.py"), 1)
        chatter.attach(tmp_path / "logs", 3)
        logging.getLogger("DeepSpeed").warning("after attach")
    text = (tmp_path / "logs" / "third_party-rank3.log").read_text()
    for said in ("Setting accelerator to CPU", "megatron says hi", "async grad allreduce", "after attach"):
        assert said in text
    assert shown == ["skipping shard"] and "skipping shard" not in text
    assert capsys.readouterr() == ("", "")
