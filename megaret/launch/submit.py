"""Submit a training run to SLURM (submitit), or run it on this machine, or just print the plan.

    python launcher/submit.py --config configs/6.7b.yaml [section.key=value ...]
    python launcher/submit.py --config configs/tiny.yaml --local          # LocalExecutor, this machine
    python launcher/submit.py --config configs/6.7b.yaml --dry-run        # layout, memory, sbatch script

The allocation comes from the config's `launch` section; the job runs `python -m megaret.train`
with the same config and overrides in every task. Without a reachable SLURM (no sbatch, or
sinfo fails) a one-node config runs here (LocalExecutor, with a message) and a multi-node one is
refused in one line naming the ways on (--dry-run; --local launch.nodes=1); with SLURM, a job it
could never start (more nodes than the partition has, no such partition) or one sbatch refuses is
one line too. A layout that cannot divide or
cannot fit in launch.gpu_mem_gb, like a config error, is refused in one line (exit 2). With
--wait the launcher exits with the job's own status: 0 done, 1 internal error, 2 user error,
75 stopped for a requeue that never came, 130 interrupted (the table in README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megaret.config import load_config
from megaret.entry import report_user_error
from megaret.errors import EXIT_USER, UserError
from megaret.launch import slurm
from megaret.launch.plan import format_plan, make_plan


class LaunchError(UserError, ValueError):
    """This machine cannot start what the config asks for (one line naming the ways on)."""


def refuse_multi_node(cfg, config: str, why: str) -> None:  # noqa: ANN001
    """A config for several nodes never silently runs on one machine."""
    launch = cfg.launch
    if launch.nodes > 1:
        raise LaunchError(
            f"{why}, and {config} needs {launch.nodes} nodes x {launch.gpus_per_node} GPUs: submit it from "
            f"a SLURM login node, see its plan with --dry-run, or run it here with --local launch.nodes=1 "
            f"(and a layout that fits one machine)")


def refuse_small_partition(cfg, config: str) -> None:  # noqa: ANN001
    """A job SLURM could never start (more nodes than its partition has, or no such partition) is
    refused here, instead of pending forever (reason PartitionConfig) or failing in sbatch."""
    known = slurm.partition_sizes()
    launch = cfg.launch
    if known is None or (launch.partition is not None and "," in launch.partition):
        return  # sinfo cannot tell, or several partitions: SLURM picks
    sizes, default = known
    name = launch.partition or default
    if launch.partition is not None and name not in sizes:
        raise LaunchError(f"SLURM has no partition {name} (it has {', '.join(sorted(sizes))}): set "
                          "launch.partition to one of them")
    if name in sizes and sizes[name] < launch.nodes:
        raise LaunchError(
            f"SLURM partition {name} has {sizes[name]} node(s), and {config} needs {launch.nodes} nodes x "
            f"{launch.gpus_per_node} GPUs: pick a partition that has them (launch.partition=..., `sinfo` "
            "lists them), see its plan with --dry-run, or use fewer nodes (launch.nodes=N, a layout that "
            "fits)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a YAML under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. launch.nodes=2 train.steps=100")
    parser.add_argument("--local", action="store_true", help="run on this machine (submitit LocalExecutor)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and sbatch script, submit nothing"
    )
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job and exit with its status (the table in README)")
    args = parser.parse_intermixed_args(argv)  # overrides before and after flags
    try:
        cfg = load_config(args.config, args.overrides)
        # the job may start elsewhere: hand it absolute paths
        run_dir = Path(cfg.run.dir).resolve()
        overrides = [o for o in args.overrides if not o.startswith("run.dir=")] + [f"run.dir={run_dir}"]
        cfg = load_config(args.config, overrides)
        plan = make_plan(cfg)
    except UserError as exc:  # a config error or a plan that cannot work
        report_user_error(exc)
        return EXIT_USER
    if args.dry_run:
        print(format_plan(plan))
        print("\n# sbatch script (submitit)\n" + slurm.sbatch_script(cfg))
        return 0
    local = args.local
    try:
        if not local:
            ok, why = slurm.slurm_available()
            if not ok:
                refuse_multi_node(cfg, args.config, f"no SLURM found ({why})")
                print(f"no SLURM reachable ({why}): running here with submitit's LocalExecutor", flush=True)
                local = True
            else:
                refuse_small_partition(cfg, args.config)
        else:
            refuse_multi_node(cfg, args.config, "--local runs on this machine only")
    except UserError as exc:
        report_user_error(exc)
        return EXIT_USER
    print(format_plan(plan), flush=True)
    try:
        job = slurm.submit(cfg, str(Path(args.config).resolve()), overrides, local)
    except UserError as exc:  # sbatch refused it
        report_user_error(exc)
        return EXIT_USER
    print(f"submitted job {job.job_id} ({'local' if local else 'slurm'}), {plan.layout.world} task(s)")
    print(f"logs        {job.paths.stdout}  {job.paths.stderr}  (per task: %t = task index)")
    print(f"run dir     {run_dir}")
    print(f"tensorboard tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)
    if not args.wait:
        return 0
    status, line = slurm.job_exit_status(job)
    print(line, file=sys.stderr if status else sys.stdout, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
