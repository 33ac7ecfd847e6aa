"""Safe under misuse (issue 12): one trainer per run.dir, resume only what it was, the last good
state never destroyed.

One module fixture launches every `python -m megaret.train` (and one `megaret.generate`) as real
processes, as many at a time as their order allows, and the tests assert on what each left:
its exit code, exactly one `megaret: error:` line for a refusal, and the saved files. Phase 1: two
trainers on one run.dir; the base run R on tiny shards; (root) a run on a small tmpfs that
fills up during its second save. Phase 2, on copies of R: resume with other data, tokenizer or
model; checkpoint.load into a fresh run.dir; a finished run (with a dead trainer's lock); every
checkpoint corrupt; checkpoint.resume=false with and without run.overwrite; generate past a
corrupt checkpoint with another tokenizer; (root) the restart once the disk has room again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from megaret.checkpoint import files
from megaret.checkpoint.identity import IdentityError, changes, check_resume
from megaret.config import load_config
from megaret.data.corpus import Source
from megaret.data.shards import build_shards
from megaret.errors import ERROR_PREFIX, EXIT_OK, EXIT_USER
from megaret.faults import plan_env
from megaret.models.spec import SPECS
from megaret.train import run_lock, start
from megaret.train.run_lock import LOCK_FILE, RunLock, RunLockError
from tests.conftest import REPO
from tests.data_fixtures import write_corpus

pytestmark = pytest.mark.multiproc

BASE = ["train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=3", "train.eval_steps=0",
        "train.log_interval=1", "data.seq_length=16", "model.chunk_size=16"]
SYNTHETIC = ["data.source=synthetic", "model.vocab_size=128"]
IS_ROOT = os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# helpers


def build(root: Path, name: str, seed: int, tokenizer: Path | None = None, vocab: int = 300) -> Path:
    """Tiny packed shards of a seeded corpus (a tokenizer trained on it unless one is given)."""
    inputs = write_corpus(root / f"{name}-src", seed=seed)
    sources = [Source(f"{name}-{p.name}", str(p), "CC0") for p in inputs]
    build_shards(sources, root / name, seq_length=16, tokenizer=tokenizer, vocab_size=vocab, mode="packed",
                 valid_fraction=0.1, samples_per_shard=64, log=lambda *a: None)
    return root / name


class Job:
    """One `python -m <module>` process, its output in files."""

    def __init__(self, work: Path, name: str, args: list[str], module: str = "megaret.train",
                 sleep_s: float = 0.0) -> None:
        self.name, self.log = name, work / "logs"
        self.log.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("MEGARET_DEBUG", None)
        if sleep_s:
            env.update(plan_env(sleep_each_step_s=sleep_s))
        self.t0 = time.perf_counter()
        with open(self.log / f"{name}.out", "w") as out, open(self.log / f"{name}.err", "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err,
                                         cwd=REPO, env=env, text=True)

    def done(self) -> bool:
        if self.proc.poll() is not None and not hasattr(self, "seconds"):
            self.seconds = time.perf_counter() - self.t0
        return self.proc.poll() is not None

    def result(self, timeout: float = 600) -> types.SimpleNamespace:
        rc = self.proc.wait(timeout=timeout)
        self.done()
        return outcome(self.log, self.name, rc, self.seconds, self.proc.pid)


def outcome(log: Path, name: str, rc: int, seconds: float, pid: int | None = None) -> types.SimpleNamespace:
    out, err = (log / f"{name}.out").read_text(), (log / f"{name}.err").read_text()
    return types.SimpleNamespace(rc=rc, out=out, err=err, pid=pid, seconds=seconds,
                                 errors=[ln for ln in err.splitlines() if ln.startswith(ERROR_PREFIX)])


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", *BASE, *extra, f"run.dir={run_dir}"]


def train(work: Path, name: str, run_dir: Path, *extra: str, sleep_s: float = 0.0) -> Job:
    return Job(work, name, train_args(run_dir, *extra), sleep_s=sleep_s)


def digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {p.relative_to(root).as_posix(): files.sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def losses(out: str) -> dict[int, float]:
    import re

    return {int(s): float(v) for s, v in re.findall(r"step\s+(\d+)/\d+ \| loss (\d+\.\d+)", out)}


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def fill(path: Path) -> None:
    """Write into `path` until the file system is full."""
    try:
        with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
            while True:
                f.write(b"\0" * 65536)
    except OSError:  # ENOSPC: full
        pass


# ---------------------------------------------------------------------------------------------
# the launches


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("rundir")
    t0 = time.perf_counter()
    d1 = build(work, "d1", seed=0)
    d2 = build(work, "d2", seed=1, tokenizer=d1 / "tokenizer.json")  # other documents, same tokenizer
    d3 = build(work, "d3", seed=0, vocab=280)  # the same documents, another tokenizer
    shard = lambda d: [f"data.paths=[{d}]"]  # noqa: E731
    r = types.SimpleNamespace(work=work, d1=d1, d2=d2, d3=d3, jobs={}, before={})
    full = work / "full"
    mounted = False
    try:
        # phase 1, separate processes: two trainers on one run.dir (the second a moment later), the
        # base run R, a run whose disk fills up between its two saves
        lock_dir = work / "locked"
        jobs = {"first": train(work, "first", lock_dir, *SYNTHETIC, sleep_s=3.0)}
        time.sleep(1.5)
        jobs["second"] = train(work, "second", lock_dir, *SYNTHETIC, sleep_s=3.0)
        jobs["base"] = train(work, "base", work / "R", *shard(d1))
        if IS_ROOT:
            full.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(full)], check=True)
            mounted = True
            jobs["full"] = train(work, "full", full / "run", *SYNTHETIC, sleep_s=1.0)
        filled, batch = False, None
        while not all(j.done() for j in jobs.values()) or batch is None:
            if IS_ROOT and not filled and (full / "run" / "checkpoints" / "step_0000002").is_dir():
                fill(full / "filler")  # between the step-2 and the step-4 save
                filled = True
            if batch is None and all(jobs[n].done() for n in ("base", "full") if n in jobs):
                if IS_ROOT:  # what the failed save left, then room again for the restart
                    r.before["full"] = digest(full / "run" / "checkpoints")
                    r.full_verified = files.verify(full / "run" / "checkpoints" / "step_0000002")["step"]
                    (full / "filler").unlink()
                batch = _phase2(work, r, shard)
                jobs["batch"] = batch
            time.sleep(0.05)
        r.jobs = {name: job.result() for name, job in jobs.items() if name != "batch"}
        assert batch.result().rc == 0, (work / "logs" / "batch.err").read_text()[-3000:]
        results = json.loads((work / "logs" / "results.json").read_text())
        r.jobs.update({n: outcome(work / "logs", n, v["rc"], v["seconds"]) for n, v in results.items()})
        r.seconds = time.perf_counter() - t0
        r.full = full
        print(f"launches took {r.seconds:.1f}s: " + ", ".join(f"{n} {j.seconds:.1f}s rc={j.rc}"
                                                             for n, j in r.jobs.items()))
        yield r
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(full)], check=False)


def _phase2(work: Path, r: types.SimpleNamespace, shard) -> Job:
    """Phase 2 on copies of R, one process for all (tests/cli_batch.py)."""
    base = work / "R"
    assert (base / "checkpoints" / "step_0000004").is_dir(), (work / "logs" / "base.err").read_text()[-3000:]
    r.base_config = (base / "config.yaml").read_bytes()
    copies = {}
    for name in ("data", "tokenizer", "model", "done", "corrupt", "noresume", "overwrite", "reader"):
        copies[name] = work / f"R-{name}"
        shutil.copytree(base, copies[name])
        r.before[name] = digest(copies[name] / "checkpoints")
    # a lock left by a trainer that died on this host
    (copies["done"] / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                         "since": time.time() - 60, "token": "dead"}))
    r.done_stat = (copies["done"] / "config.yaml").stat().st_mtime_ns
    r.done_events = sorted(p.name for p in (copies["done"] / "tensorboard").iterdir())
    # every checkpoint damaged: bytes changed in one, a truncated file in the other
    ck = copies["corrupt"] / "checkpoints"
    flip(ck / "step_0000004" / "ds" / "mp_rank_00_model_states.pt")
    optim = ck / "step_0000002" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(optim, optim.stat().st_size - 100)
    r.before["corrupt"] = digest(ck)
    flip(copies["reader"] / "checkpoints" / "step_0000004" / "ds" / "mp_rank_00_model_states.pt")
    r.copies = copies
    train_cases = {
        "data": train_args(copies["data"], *shard(r.d2)),
        "tokenizer": train_args(copies["tokenizer"], *shard(r.d3)),
        "model": train_args(copies["model"], *shard(r.d1), "model.hidden_size=32"),
        "corrupt": train_args(copies["corrupt"], *shard(r.d1)),
        "noresume": train_args(copies["noresume"], *shard(r.d1), "checkpoint.resume=false"),
        "done": train_args(copies["done"], *shard(r.d1)),
        "weights": train_args(work / "W", *shard(r.d2), f"checkpoint.load={base}",
                              "checkpoint.load_mode=weights"),
        "overwrite": train_args(copies["overwrite"], *shard(r.d1), "checkpoint.resume=false",
                                "run.overwrite=true"),
        "optimizer": train_args(work / "W-opt", *shard(r.d2), f"checkpoint.load={base}",
                                "checkpoint.load_mode=weights+optimizer"),
        "all": train_args(work / "W-all", *shard(r.d1), f"checkpoint.load={base}", "checkpoint.load_mode=all",
                          "train.steps=6"),
    }
    if IS_ROOT:
        train_cases["restart"] = train_args(r.work / "full" / "run", *SYNTHETIC)
    cases = [{"name": n, "module": "megaret.train.__main__", "argv": a} for n, a in train_cases.items()]
    cases.append({"name": "reader", "module": "megaret.generate", "argv": [
        "--checkpoint", str(copies["reader"]), "--prompt", "the", "--greedy", "--max-new-tokens", "4",
        "--tokenizer", str(r.d3 / "tokenizer.json")]})
    spec = work / "cases.json"
    spec.write_text(json.dumps(cases))
    return Job(work, "batch", [str(spec), str(work / "logs")], module="tests.cli_batch")


def one_error(job) -> str:
    assert job.rc == EXIT_USER, (job.rc, job.out[-2000:], job.err[-3000:])
    assert len(job.errors) == 1, job.err[-3000:]
    assert "Traceback" not in job.err, job.err[-3000:]
    return job.errors[0]


# ---------------------------------------------------------------------------------------------
# item 2: one trainer per run.dir


def test_a_second_trainer_on_a_run_dir_is_refused_and_the_first_finishes(runs):
    a, b = runs.jobs["first"], runs.jobs["second"]
    winner, loser = (a, b) if a.rc == EXIT_OK else (b, a)
    assert winner.rc == EXIT_OK, (a.rc, b.rc, a.err[-2000:], b.err[-2000:])
    line = one_error(loser)
    assert f"PID {winner.pid}" in line and f"host {socket.gethostname()}" in line and "since" in line, line
    assert "in use by another trainer" in line and "another run.dir" in line, line
    run_dir = runs.work / "locked"
    assert [p.name for _, p in files.list_checkpoints(run_dir / "checkpoints")] == ["step_0000002",
                                                                                  "step_0000004"]
    assert not (run_dir / LOCK_FILE).exists()  # released at the end


def test_a_lock_left_by_a_dead_trainer_is_taken_over(runs):
    job = runs.jobs["done"]
    assert job.rc == EXIT_OK, job.err[-3000:]
    assert "taking over the lock" in job.err and "dead trainer" in job.err, job.err[-2000:]
    assert not (runs.copies["done"] / LOCK_FILE).exists()


def test_lock_decisions_in_process(tmp_path):
    host = socket.gethostname()

    def plant(run_dir: Path, **holder) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        path.write_text(json.dumps({"host": host, "pid": os.getppid(), "since": time.time(), "token": "t",
                                    **holder}))
        return path

    # a live trainer on this host: refused, naming it
    plant(tmp_path / "live")
    with pytest.raises(RunLockError, match=f"host {host}, PID {os.getppid()}, since .*another run.dir"):
        RunLock(tmp_path / "live").acquire()
    # another host, heartbeat an hour old: taken over at once
    old = plant(tmp_path / "stale", host="elsewhere")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    lock = RunLock(tmp_path / "stale").acquire()
    assert json.loads(old.read_text())["token"] == lock.me.token
    lock.release()
    assert not old.exists()
    # another host, fresh heartbeat that never moves: watched for stale_s, then taken over
    plant(tmp_path / "silent", host="elsewhere")
    t = time.monotonic()
    RunLock(tmp_path / "silent", heartbeat_s=0.2, stale_s=0.8).acquire().release()
    assert time.monotonic() - t >= 0.7
    # another host whose heartbeat moves: refused
    beating = plant(tmp_path / "beating", host="elsewhere")
    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            os.utime(beating)

    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(RunLockError, match="host elsewhere"):
            RunLock(tmp_path / "beating", heartbeat_s=0.2, stale_s=2.0).acquire()
    finally:
        stop.set()
    # flock held by a live holder outranks a heartbeat that looks stale (a file system with flock)
    held = plant(tmp_path / "flocked", host="elsewhere")
    os.utime(held, (time.time() - 3600, time.time() - 3600))
    import fcntl

    fd = os.open(held, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunLockError, match="in use by another trainer"):
            RunLock(tmp_path / "flocked").acquire()
    finally:
        os.close(fd)
    # a Trainer of this process built again on the same run.dir takes over its own earlier lock
    first = RunLock(tmp_path / "again", heartbeat_s=0.1).acquire()
    second = RunLock(tmp_path / "again", heartbeat_s=0.1).acquire()
    time.sleep(0.3)  # the first one's heartbeat stopped: it does not see a lost lock
    assert not first.lost
    assert json.loads((tmp_path / "again" / LOCK_FILE).read_text())["token"] == second.me.token
    second.release()
    assert not run_lock._HELD


# ---------------------------------------------------------------------------------------------
# item 3: resume only what it was


@pytest.mark.parametrize("case, what", [
    ("data", "other data"), ("tokenizer", "another tokenizer"), ("model", "another model")])
def test_resume_with_other_data_tokenizer_or_model_is_refused(runs, case, what):
    line = one_error(runs.jobs[case])
    assert f"with {what}" in line or f", {what}" in line or f"and {what}" in line, line
    assert "checkpoint.load=" in line and "load_mode=weights" in line, line  # the fix
    if case == "data":
        assert str(runs.d1) in line and str(runs.d2) in line and " -> " in line, line
    if case == "model":
        assert "model.hidden_size 64 -> 32" in line, line
    if case == "tokenizer":
        assert "tokenizer sha256" in line and " -> sha256 " in line, line
    copy = runs.copies[case]
    assert digest(copy / "checkpoints") == runs.before[case]  # nothing saved was touched
    assert (copy / "config.yaml").read_bytes() == runs.base_config  # nor the run's config
    assert not (copy / LOCK_FILE).exists()


def test_checkpoint_load_weights_starts_a_fresh_run_dir(runs):
    job = runs.jobs["weights"]
    assert job.rc == EXIT_OK, job.err[-3000:]
    assert "load_mode=weights), at step 0" in job.err, job.err[-2000:]
    w = runs.work / "W" / "checkpoints"
    manifest = files.verify(w / "step_0000004")
    assert manifest["trainer"]["step"] == 4  # counted from 0: 4 steps of its own
    assert manifest["identity"]["data"]["manifests"][0]["location"].startswith(str(runs.d2))
    base = losses(runs.jobs["base"].out)
    tuned = losses(job.out)
    # the loaded weights start where R's training got to, not at a random model's loss
    assert tuned[1] < base[1] - 0.05, (base, tuned)
    assert (runs.work / "R" / "checkpoints" / "step_0000004").is_dir()  # the source is only read


def test_checkpoint_load_weights_and_optimizer_or_all(runs):
    job = runs.jobs["optimizer"]
    assert job.rc == EXIT_OK, job.err[-3000:]
    assert "load_mode=weights+optimizer), at step 0" in job.err, job.err[-2000:]
    assert [s for s, _ in files.list_checkpoints(runs.work / "W-opt" / "checkpoints")] == [2, 4]
    job = runs.jobs["all"]  # R's step 4, data position and all: it goes on with steps 5 and 6
    assert job.rc == EXIT_OK, job.err[-3000:]
    assert "load_mode=all), at step 4" in job.err and sorted(losses(job.out)) == [5, 6], job.out[-2000:]
    ck = runs.work / "W-all" / "checkpoints"
    assert [s for s, _ in files.list_checkpoints(ck)] == [6]
    assert files.verify(ck / "step_0000006")["trainer"]["step"] == 6


def test_already_trained_exits_0_and_keeps_config(runs):
    job = runs.jobs["done"]
    assert job.rc == EXIT_OK and not job.errors, job.err[-3000:]
    assert "already trained to step 4 of 4" in job.out, job.out[-2000:]
    copy = runs.copies["done"]
    assert (copy / "config.yaml").read_bytes() == runs.base_config
    assert (copy / "config.yaml").stat().st_mtime_ns == runs.done_stat
    assert sorted(p.name for p in (copy / "tensorboard").iterdir()) == runs.done_events
    assert digest(copy / "checkpoints") == runs.before["done"]


def test_identity_changes_name_old_and_new():
    cfg = load_config("configs/tiny.yaml", SYNTHETIC)
    from megaret.checkpoint.identity import run_identity

    now = run_identity(cfg)
    assert now["model.hidden_size"] == 64 and now["tokenizer"] is None
    assert now["data"] == {"source": "synthetic"}
    other = {**now, "model.num_layers": 4, "tokenizer": "ab" * 32}
    assert changes(other, now) == {"model": ["model.num_layers 4 -> 2"],
                                   "tokenizer": [f"tokenizer sha256 {'ab' * 6} -> none"]}
    assert changes(now, now) == {}
    # a layout, train.steps, interval or logging change is not an identity change
    more = run_identity(load_config("configs/tiny.yaml", [
        *SYNTHETIC, "train.steps=99", "parallel.zero_stage=2", "checkpoint.interval=7",
        "logging.tensorboard=false"]))
    assert more == now
    ckpt = Path("/runs/x/checkpoints/step_0000010")
    with pytest.raises(IdentityError, match=r"step_0000010 with another tokenizer and another model"):
        check_resume(ckpt, other, now)
    assert "no identity record" in check_resume(ckpt, None, now)


def test_every_arch_lists_its_model_defining_fields():
    from megaret.config.schema import ModelConfig

    fields = set(ModelConfig.__dataclass_fields__)
    for spec in SPECS.values():
        shape = {"vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"}
        assert shape <= set(spec.identity_fields)
        assert set(spec.identity_fields) <= fields
        assert "chunk_size" not in spec.identity_fields and "dropout" not in spec.identity_fields
    assert "value_factor" in SPECS["retnet"].identity_fields
    assert "num_states" in SPECS["brt"].identity_fields


# ---------------------------------------------------------------------------------------------
# item 4: the last good state is never destroyed


def test_every_checkpoint_corrupt_stops_and_keeps_them(runs):
    line = one_error(runs.jobs["corrupt"])
    assert "every checkpoint in" in line and "failed verification" in line, line
    assert "step_0000004: " in line and "mp_rank_00_model_states.pt has sha256" in line, line
    assert "step_0000002: " in line and "(truncated?)" in line, line
    assert "checkpoint.resume=false run.overwrite=true" in line, line
    ck = runs.copies["corrupt"] / "checkpoints"
    assert files.list_checkpoints(ck) == []
    moved = {k.replace("rejected/", "", 1): v for k, v in digest(ck).items() if k.startswith("rejected/")}
    assert moved == {k: v for k, v in runs.before["corrupt"].items() if k.startswith("step_")}  # all kept
    # a later start finds only rejected ones: it stops too, instead of training from step 0
    cfg = load_config("configs/tiny.yaml", [*BASE, f"data.paths=[{runs.d1}]", f"run.dir={ck.parent}"])
    with pytest.raises(files.CheckpointError, match="failed verification at an earlier start"):
        start._plan(cfg)


def test_resume_false_on_a_used_run_dir(runs):
    line = one_error(runs.jobs["noresume"])
    assert "already holds checkpoints" in line and "run.overwrite=true" in line, line
    assert digest(runs.copies["noresume"] / "checkpoints") == runs.before["noresume"]
    job = runs.jobs["overwrite"]
    assert job.rc == EXIT_OK, job.err[-3000:]
    copy = runs.copies["overwrite"]
    (aside,) = copy.glob("replaced-*")
    assert digest(aside / "checkpoints") == runs.before["overwrite"]  # the earlier run, whole
    assert (aside / "config.yaml").read_bytes() == runs.base_config
    assert [s for s, _ in files.list_checkpoints(copy / "checkpoints")] == [2, 4]
    assert "run.overwrite=true: moved the earlier run's checkpoints, tensorboard, config.yaml" in job.err


def test_overwrite_needs_resume_false():
    with pytest.raises(Exception, match="run.overwrite=true starts run.dir over"):
        load_config("configs/tiny.yaml", ["run.overwrite=true"])


@pytest.mark.root_install
def test_full_disk_during_a_save(runs):
    if not IS_ROOT:
        pytest.skip("needs root to mount a small tmpfs as run.dir")
    line = one_error(runs.jobs["full"])
    assert line.startswith(f"{ERROR_PREFIX} no space left on tmpfs ({runs.full}"), line
    assert "checkpoint of step 4 not written; last good checkpoint is step 2" in line, line
    ck = runs.full / "run" / "checkpoints"
    assert runs.full_verified == 2  # the previous checkpoint verified after the failure
    left = {k.split("/")[0] for k in runs.before["full"]}
    assert left == {"latest", "step_0000002"}, left  # the partial save of step 4 is gone
    job = runs.jobs["restart"]  # the disk has room again: it resumes from step 2 and finishes
    assert job.rc == EXIT_OK, job.err[-3000:]
    assert "resumed from" in job.err and "step_0000002 (step 2)" in job.err
    assert files.verify(ck / "step_0000004")["trainer"]["step"] == 4


def test_readers_fall_back_in_one_warning_and_warn_of_another_tokenizer(runs):
    job = runs.jobs["reader"]
    assert job.rc == EXIT_OK, job.err[-3000:]
    warnings = [ln for ln in job.err.splitlines() if "warning" in ln.lower() and "megaret" in ln]
    fallback = [ln for ln in warnings if "using the older checkpoint" in ln]
    assert len(fallback) == 1 and "step_0000002" in fallback[0] and "step_0000004: " in fallback[0], job.err
    tok = [ln for ln in warnings if "--tokenizer" in ln]
    assert len(tok) == 1 and "is not the one the checkpoint was trained with" in tok[0], job.err


def test_a_checkpoint_pruned_while_read_is_read_again(runs, monkeypatch, caplog):
    from megaret.checkpoint import consolidate as cons

    run_dir = runs.work / "pruned"
    shutil.copytree(runs.work / "R", run_dir)
    real = cons._consolidate
    calls = []

    def pruned_under_us(ckpt, *args):
        calls.append(ckpt.name)
        if len(calls) == 1:  # a live run removes it between the choice and the reading
            shutil.rmtree(ckpt)
        return real(ckpt, *args)

    monkeypatch.setattr(cons, "_consolidate", pruned_under_us)
    with caplog.at_level(logging.WARNING, logger="megaret.checkpoint"):
        state, manifest = cons.consolidate(run_dir)
    assert calls == ["step_0000004", "step_0000002"] and manifest["step"] == 2
    assert any("disappeared while it was read" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_vanishing_during_selection_is_not_a_rejection(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        tmp = root / f".tmp-{step}"
        tmp.mkdir(parents=True)
        (tmp / "rank_00000.pt").write_bytes(b"x" * 10)
        files.publish(tmp, root / files.step_name(step), {"step": step})
    real = files.verify

    def pruned(ckpt):
        if ckpt.name == "step_0000004" and ckpt.exists():
            shutil.rmtree(ckpt)  # and a newer one appears, as a live run does
            tmp = root / ".tmp-6"
            tmp.mkdir()
            (tmp / "rank_00000.pt").write_bytes(b"y")
            files.publish(tmp, root / files.step_name(6), {"step": 6})
        return real(ckpt)

    monkeypatch.setattr(files, "verify", pruned)
    sel = files.select_newest_valid(root)
    assert sel.path == root / "step_0000006" and sel.rejected == []
