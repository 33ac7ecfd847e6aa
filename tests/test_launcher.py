"""launcher/submit.py: --dry-run plans, refusals, and real runs on SLURM, sbatch + srun, and --local.

The SLURM tests submit to a real single-node SLURM (slurm/local/start.sh, fixture `local_slurm`,
root only); the --local test runs submitit's LocalExecutor here. Every real run trains the tiny
config on 2 tasks at TP=2, which only works if the two tasks form one torch.distributed world.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from megaret.config import load_config
from megaret.launch.slurm import slurm_available
from tests.conftest import REPO, tensorboard_scalars

STEPS = 4
TINY_TP2 = [
    "parallel.tensor=2",
    "parallel.backend=gloo",  # CPU ranks also on a GPU machine (two ranks cannot share one GPU under NCCL)
    f"train.steps={STEPS}",
    "train.log_interval=1",
    "launch.tasks_per_node=2",
    "launch.cpus_per_task=1",
    "launch.time_min=10",
]


def submit_main():
    spec = importlib.util.spec_from_file_location("megaret_submit", REPO / "launcher" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "launcher" / "submit.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def check_tp2_run(run_dir, logs_prefix) -> list[tuple[int, float]]:
    """Artefacts of a finished 2-task run: resolved config, both tasks' logs, a loss per step."""
    assert load_config(run_dir / "config.yaml").parallel.tensor == 2
    losses = tensorboard_scalars(run_dir)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), losses
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    out0 = (logs_prefix.parent / f"{logs_prefix.name}_0_log.out").read_text()
    out1 = (logs_prefix.parent / f"{logs_prefix.name}_1_log.out").read_text()
    assert "task 0/2" in out0 and "task 1/2" in out1
    last_step = re.compile(rf"^step\s+{STEPS}\b.*\bloss\b", re.M)
    assert last_step.search(out0) and not re.search(r"^step\s", out1, re.M)  # rank 0 reports for the world
    return losses


# ---------------------------------------------------------------------------------------------
# planning (no SLURM needed)


def test_dry_run_6_7b_prints_the_built_parameter_count_and_memory(ctx1, capsys):
    from megaret.models.spec import build_model
    from megaret.parallel.megatron_config import megatron_config

    assert submit_main()(["--config", "configs/6.7b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("configs/6.7b.yaml", ["parallel.tensor=1", "parallel.pipeline=1"])
    with torch.device("meta"):
        model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
    built = sum(p.numel() for p in model.parameters())
    printed = int(re.search(r"parameters\s+([\d,]+) total", out).group(1).replace(",", ""))
    assert printed == built == 6_705_127_424
    assert "world size        32 = 4 node(s) x 8 task(s)" in out
    assert "TP=4 x PP=2 x DP=4" in out and "512 micro-batch(es)" in out and "4,194,304 tokens" in out
    assert "ZeRO-1, bf16" in out
    rows = re.findall(r"^\s+([01])\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["0", "1"]
    for _, w, g, o, a, total in rows:  # GiB: bf16 weights of ~838M params, ZeRO-1 optimizer over DP=4
        assert float(w) == float(g) == pytest.approx(1.56, abs=0.01)
        assert float(o) == pytest.approx(2.34, abs=0.01)
        assert float(total) == pytest.approx(float(w) + float(g) + float(o) + float(a), abs=0.02)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=2880",
        "#SBATCH --signal=USR2@90",
        "-m submitit.core._submit",
    ):
        assert line in out


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (["launch.gpus_per_node=3"], "world size 12 is not divisible"),
        (
            ["parallel.tensor=1", "parallel.pipeline=1", "launch.gpu_mem_gb=16"],
            "does not fit: pipeline stage 0",
        ),
    ],
)
def test_impossible_layout_is_refused(overrides, reason, capsys):
    assert submit_main()(["--config", "configs/6.7b.yaml", "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megaret: error: ") and reason in err


def test_config_error_exits_2(capsys):
    assert submit_main()(["--config", "configs/tiny.yaml", "--dry-run", "launch.nodez=2"]) == 2
    assert "launch.nodez: unknown key" in capsys.readouterr().err


def test_no_sbatch_means_no_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm_available() == (False, "no sbatch on PATH")


def test_the_headline_command_without_slurm_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    """configs/6.7b.yaml (4 nodes x 8 GPUs) on a machine without SLURM, or with --local: refused in
    one line naming the ways on, before anything starts; overrides may follow the flags."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    run_dir = tmp_path / "run"
    assert submit_main()(["--config", "configs/6.7b.yaml", f"run.dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("megaret: error: no SLURM found (no sbatch on PATH), and configs/6.7b.yaml needs "
                          "4 nodes x 8 GPUs") and "--dry-run" in err and "--local launch.nodes=1" in err
    assert submit_main()(["--config", "configs/6.7b.yaml", "--local", f"run.dir={run_dir}"]) == 2
    assert "--local runs on this machine only" in capsys.readouterr().err
    assert not run_dir.exists()
    assert submit_main()(["--config", "configs/6.7b.yaml", "--dry-run", "launch.nodes=2"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out  # the override after --dry-run applied


# ---------------------------------------------------------------------------------------------
# real runs


@pytest.mark.multiproc
def test_local_executor_runs_two_tasks(tmp_path):
    proc = run_cli("--config", "configs/tiny.yaml", "--local", "--wait", *TINY_TP2, f"run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) \(local\), 2 task\(s\)", proc.stdout).group(1)
    assert f"tensorboard --logdir {tmp_path}/tensorboard" in proc.stdout
    check_tp2_run(tmp_path, tmp_path / "submitit" / job_id)


def test_wait_gives_the_jobs_own_status_for_a_user_error(tmp_path, monkeypatch):
    """A task whose trainer stops on a user error (exit 2) makes the launcher's --wait return 2 (the
    LocalExecutor runs a stand-in entry that fails at once)."""
    from megaret.launch import slurm

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    cfg = load_config("configs/tiny.yaml", [f"run.dir={tmp_path}"])
    job = slurm.submit(cfg, str(REPO / "configs/tiny.yaml"), [], local=True,
                       entry="tests.fixtures.user_error_entry")
    status, line = slurm.job_exit_status(job)
    assert status == 2, line
    assert "python -m tests.fixtures.user_error_entry exited with status 2 (task 0)" in line
    assert "megaret: error: run.dir=/nowhere is not writable" in job.stderr()


@pytest.mark.root_install
def test_jobs_slurm_cannot_start_or_sbatch_refuses_are_one_line(local_slurm, tmp_path, capsys):
    """The local SLURM has one node per partition (debug, the default, and high): the headline 4-node
    config and an unknown partition are refused before sbatch (not left pending forever); a job
    sbatch itself refuses ends in one `megaret: error:` line, no traceback and no job."""
    main, run_dir = submit_main(), tmp_path / "run"
    assert main(["--config", "configs/6.7b.yaml", f"run.dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("megaret: error: SLURM partition debug has 1 node(s), and "
                                        "configs/6.7b.yaml needs 4 nodes x 8 GPUs: pick a partition"), err
    assert len(err.splitlines()) == 1 and "--dry-run" in err
    assert main(["--config", "configs/6.7b.yaml", "launch.partition=nope", f"run.dir={run_dir}"]) == 2
    assert capsys.readouterr().err == ("megaret: error: SLURM has no partition nope (it has debug, high): "
                                       "set launch.partition to one of them\n")
    assert not run_dir.exists()
    assert main(["--config", "configs/tiny.yaml", "launch.constraint=nosuchfeature", f"run.dir={run_dir}"]) \
        == 2
    out, err = capsys.readouterr()
    assert "submitted job" not in out and "Traceback" not in err
    assert err.splitlines()[-1].startswith("megaret: error: sbatch refused the job: ") and "feature" in err


@pytest.fixture(scope="module")
def slurm_run(local_slurm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm_run")
    proc = run_cli("--config", "configs/tiny.yaml", "--wait", *TINY_TP2, f"run.dir={run_dir}")
    return run_dir, proc


@pytest.mark.root_install
def test_submit_to_slurm_runs_two_tasks(slurm_run):
    run_dir, proc = slurm_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) \(slurm\), 2 task\(s\)", proc.stdout).group(1)
    assert f"logs        {run_dir}/submitit/{job_id}_0_log.out" in proc.stdout
    check_tp2_run(run_dir, run_dir / "submitit" / job_id)
    script = (run_dir / "submitit" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gpus-per-node=1" in script
    for _ in range(60):  # the accounting record trails the job's end by a few seconds
        sacct = subprocess.run(
            ["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True
        )
        state = sacct.stdout.split() if sacct.returncode == 0 else []
        if state and state[0] not in ("RUNNING", "COMPLETING", "PENDING"):
            break
        time.sleep(1)
    assert state == ["COMPLETED"], (state, sacct.stderr[-500:])


@pytest.mark.root_install
def test_sbatch_template_trains_like_submitit(slurm_run, tmp_path):
    """slurm/train.sbatch (srun, no submitit) at TP=2: the same losses as the submitit job."""
    submitit_dir, proc = slurm_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = [o for o in TINY_TP2 if not o.startswith("launch.")]
    out = tmp_path / "job.out"
    job = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--parsable",
            "--ntasks-per-node=2",
            "--gpus-per-node=1",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={out}",
            f"--export=ALL,PYTHON={sys.executable},OMP_NUM_THREADS=1",
            str(REPO / "slurm" / "train.sbatch"),
            "configs/tiny.yaml",
            *overrides,
            f"run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    log = out.read_text() if out.exists() else ""
    assert job.returncode == 0, job.stderr + log[-4000:]
    assert "1 node(s) x 2 task(s)" in log
    assert len(re.findall(rf"^step\s+{STEPS}\b.*\bloss\b", log, re.M)) == 1  # one world, rank 0 reports
    losses, reference = tensorboard_scalars(tmp_path), tensorboard_scalars(submitit_dir)
    assert len(losses) == STEPS and losses == reference
