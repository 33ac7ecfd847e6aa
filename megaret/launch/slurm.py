"""submitit glue: the job's task function, the executor built from `launch`, and its sbatch script.

The job runs `TrainTask`, which sets up torch.distributed's variables from submitit's
`JobEnvironment` and calls the trainer entry's `main(argv)` in the task's own process (one
per GPU: `tasks_per_node` tasks on each of `nodes` nodes).

Requeue. `TrainTask` is a `submitit.helpers.Checkpointable`: when SLURM sends USR2 before the
time limit (submitit asks for `--signal=USR2@90`) or someone runs `scancel --signal=USR2`,
submitit calls `TrainTask.checkpoint()`, which resubmits the same task; the new run resumes
from the newest checkpoint in run.dir (`checkpoint.resume=true`). The trainer first finishes
its step and saves a checkpoint there (megaret/train/signals.py), then calls submitit's handler.
Preemption and `scontrol requeue` send SIGTERM, then SIGKILL after KillWait: the trainer saves
if the grace period allows, else the job resumes from its last periodic checkpoint.

Exit status. A task whose trainer ends with a final status of the table in megaret/errors.py (2
user error, 130 interrupted) raises `TaskFailed`, which names it in the job's result, so
`job_exit_status` (`launcher/submit.py --wait`) returns the trainer's own status; 75 (and
submitit's own exit after a requeue) passes through untouched, for the requeue.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission

from megaret.config import Config, LaunchConfig
from megaret.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER, UserError
from megaret.parallel.launch_env import set_cuda_launch_env

#: The module whose `main(argv) -> int | None` the job runs (`python -m TRAIN_ENTRY --config ...`).
#: "megaret.smoke" is the stand-in the trainer replaced.
TRAIN_ENTRY = "megaret.train"


def entry_main(entry: str = TRAIN_ENTRY) -> Callable[[list[str]], Any]:
    """`main` of a module, or of its package's `__main__`."""
    module = importlib.import_module(entry)
    main = getattr(module, "main", None)
    if main is None:
        main = importlib.import_module(f"{entry}.__main__").main
    return main


class TaskFailed(RuntimeError):
    """The trainer of one task ended with a final non-zero status (recorded in the job's result)."""

    def __init__(self, status: int, entry: str, task: int) -> None:
        super().__init__(f"python -m {entry} exited with status {status} (task {task}); "
                         "its log (submitit/<job>_<task>_log.err) says why")
        self.status = status


_STATUS_RE = re.compile(r"TaskFailed: (python -m \S+ exited with status (\d+)[^\n]*)")


class TrainTask(Checkpointable):
    """The submitted callable: one call per task; USR2 requeues it (see the module docstring)."""

    def __init__(self, config: str, overrides: list[str], entry: str = TRAIN_ENTRY) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.entry = entry

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for env:// (overwrite: a
        # requeued or nested job must not keep a stale rank). CUDA_VISIBLE_DEVICES stays as
        # SLURM set it: the context picks the device by LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        set_cuda_launch_env()  # before the trainer creates a CUDA context
        argv = ["--config", self.config, *self.overrides]
        print(
            f"task {env.global_rank}/{env.num_tasks} on {env.hostname}: python -m {self.entry} "
            f"{shlex.join(argv)}",
            flush=True,
        )
        try:
            rc = entry_main(self.entry)(argv)
        except SystemExit as exc:
            if exc.code not in (EXIT_USER, EXIT_INTERRUPTED):
                raise  # 75 or submitit's own exit after a requeue: no result, the job comes back
            rc = exc.code
        if rc not in (None, 0):
            raise TaskFailed(int(rc), self.entry, env.global_rank)
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # The trainer resumes from run.dir by itself: resubmitting the same call is enough.
        return DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# executor parameters and the sbatch script


def slurm_parameters(launch: LaunchConfig, job_name: str) -> dict[str, Any]:
    """`launch` as submitit SlurmExecutor parameters (sbatch option names)."""
    params: dict[str, Any] = {
        "job_name": job_name, "time": launch.time_min, "nodes": launch.nodes,
        "ntasks_per_node": launch.resolved_tasks_per_node, "cpus_per_task": launch.cpus_per_task,
        "gpus_per_node": launch.gpus_per_node,
    }  # fmt: skip
    if launch.mem_gb is not None:
        params["mem"] = f"{launch.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key) is not None:
            params[key] = getattr(launch, key)
    if launch.extra_sbatch:
        # "" is a bare flag (--exclusive); submitit writes True as one
        params["additional_parameters"] = {
            k.lstrip("-"): (v if v != "" else True) for k, v in launch.extra_sbatch.items()
        }
    return params


def job_folder(cfg: Config) -> Path:
    """submitit's folder: pickles and per-task logs (%j = job id, %t = task)."""
    return Path(cfg.run.dir) / "submitit"


def sbatch_script(cfg: Config) -> str:
    """The sbatch file SlurmExecutor would submit for this config (no SLURM needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(cfg)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg.launch, job_name(cfg)))


def job_name(cfg: Config) -> str:
    return cfg.run.name or Path(cfg.run.dir).name or "megaret"


def slurm_available() -> tuple[bool, str]:
    """(True, "") when sbatch is on PATH and `sinfo` answers; else (False, why not)."""
    if shutil.which("sbatch") is None:
        return False, "no sbatch on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"sinfo failed: {exc}"
    if proc.returncode != 0:
        return False, f"sinfo failed: {(proc.stderr or proc.stdout).strip()[:200]}"
    return True, ""


def partition_sizes() -> tuple[dict[str, int], str | None] | None:
    """({partition: its node count}, the default partition) from `sinfo`, or None when it cannot
    tell. sinfo prints a line per partition and node state; the default partition ends in `*`."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    sizes: dict[str, int] = {}
    default = None
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        name = parts[0].rstrip("*")
        default = name if parts[0].endswith("*") else default
        sizes[name] = sizes.get(name, 0) + int(parts[1])
    return (sizes, default) if sizes else None


class SubmitError(UserError):
    """sbatch refused the job (a partition, account, qos, constraint or limit SLURM does not accept)."""


def make_executor(cfg: Config, local: bool) -> submitit.Executor:
    """SlurmExecutor from `launch`, or LocalExecutor (one node, the same tasks) on this machine."""
    folder = job_folder(cfg)
    la = cfg.launch
    if local:
        if la.nodes != 1:
            raise ValueError(
                f"--local runs on this one machine but launch.nodes={la.nodes}; set launch.nodes=1"
            )
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=la.time_min, tasks_per_node=la.resolved_tasks_per_node, nodes=1
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**slurm_parameters(la, job_name(cfg)))
    return executor


def submit(
    cfg: Config, config_path: str, overrides: list[str], local: bool, entry: str = TRAIN_ENTRY
) -> submitit.Job:
    """Submit the training job; the task gets the same config file and overrides."""
    executor = make_executor(cfg, local)
    try:
        return executor.submit(TrainTask(config_path, overrides, entry))
    except FailedJobError as exc:  # sbatch's own refusal (submitit raises it with sbatch's stderr)
        if local:
            raise
        lines = [ln.strip().removeprefix("sbatch: error: ") for ln in str(exc).splitlines()]
        why = "; ".join(ln for ln in lines if ln)
        raise SubmitError(f"sbatch refused the job: {why}; check the launch section (launch.partition, "
                          "launch.account, launch.qos, launch.constraint, launch.extra_sbatch; `sinfo` lists "
                          "the partitions) and the sbatch script --dry-run prints") from None


def job_exit_status(job: submitit.Job) -> tuple[int, str]:
    """Wait for `job`; (its status by the table in megaret/errors.py, a line saying so).

    A task's `TaskFailed` gives the trainer's own status; a job that produced no result (killed,
    or stopped for a requeue that never came) gives SLURM's exit code when sacct knows it, else 1.
    """
    try:
        job.results()
    except FailedJobError as exc:  # a task raised: its traceback is the message
        m = _STATUS_RE.search(str(exc))
        status = int(m.group(2)) if m else EXIT_INTERNAL
        why = m.group(1) if m else f"a task failed with a traceback (internal error); see {job.paths.stderr}"
        return status, f"job {job.job_id} failed with status {status}: {why}"
    except UncompletedJobError:
        status = _sacct_exit_code(job.job_id) if isinstance(job, submitit.SlurmJob) else None
        status = EXIT_INTERNAL if not status else status
        return status, f"job {job.job_id} ended without a result (state {job.state}), status {status}; " \
            f"see {job.paths.stderr}"
    return EXIT_OK, f"job {job.job_id} completed"


def _sacct_exit_code(job_id: str) -> int | None:
    try:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "ExitCode"], capture_output=True,
                             text=True, timeout=30).stdout.split()
        return int(out[0].split(":")[0]) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
