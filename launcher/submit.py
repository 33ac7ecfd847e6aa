"""Submit a training run to SLURM (submitit), or run it on this machine, or just print the plan.

    python launcher/submit.py --config configs/6.7b.yaml [section.key=value ...]
    python launcher/submit.py --config configs/tiny.yaml --local          # LocalExecutor, this machine
    python launcher/submit.py --config configs/6.7b.yaml --dry-run        # layout, memory, sbatch script

The allocation comes from the config's `launch` section; the job runs `python -m megaret.train`
with the same config and overrides in every task. Without a reachable SLURM (no sbatch, or
sinfo fails) the run goes to the LocalExecutor, with a message. A layout that cannot divide or
cannot fit in launch.gpu_mem_gb, like a config error, is refused in one line (exit 2).
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
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    args = parser.parse_args(argv)
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
    if not local:
        ok, why = slurm.slurm_available()
        if not ok:
            print(f"no SLURM reachable ({why}): running here with submitit's LocalExecutor", flush=True)
            local = True
    print(format_plan(plan), flush=True)
    job = slurm.submit(cfg, str(Path(args.config).resolve()), overrides, local)
    print(f"submitted job {job.job_id} ({'local' if local else 'slurm'}), {plan.layout.world} task(s)")
    print(f"logs        {job.paths.stdout}  {job.paths.stderr}  (per task: %t = task index)")
    print(f"run dir     {run_dir}")
    print(f"tensorboard tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as exc:  # submitit raises the task's failure with its traceback
        print(f"job {job.job_id} failed: {exc}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed ({plan.layout.world} task(s) returned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
