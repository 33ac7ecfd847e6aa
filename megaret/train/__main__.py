"""Train a model (model.arch: retnet, transformer, sliding or brt):
python -m megaret.train --config configs/tiny.yaml [section.key=value ...]

Under torchrun every rank runs this; the layout comes from parallel.* and the world size.
Writes run.dir/config.yaml (the resolved config), run.dir/tensorboard/ and
run.dir/logs/third_party-rank{N}.log (DeepSpeed's and other libraries' messages). Rank 0 holds
run.dir/megaret.lock while it runs (one trainer per run.dir). A run.dir already trained to
train.steps says so and exits 0, its config.yaml untouched.
Exit status: 0 done, 1 internal error, 2 user error (one `megaret: error:` line), 75 stopped by
USR1/USR2/TERM after checkpointing (run again to resume), 76 lost a peer (a rank, host or link died;
one line names it; run again to resume), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megaret.config import load_config
from megaret.entry import run_entry
from megaret.parallel.launch_env import discover_launch_env
from megaret.train.chatter import ThirdPartyLog
from megaret.train.signals import StopSignals


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML under configs/ (or a run dir)")
    parser.add_argument("--print-config", action="store_true",
                        help="print every key with its value (default, or --config's), type and meaning")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides before and after flags
    if args.config is None and not args.print_config:
        parser.error("the following arguments are required: --config")
    return args


def _print_config(config: str | None, overrides: list[str]) -> int:
    from megaret.config.describe import format_config

    print(format_config(load_config(config, overrides)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.print_config:
        return run_entry(lambda: _print_config(args.config, args.overrides))
    # before anything slow (importing DeepSpeed, building the model, checking shards, resuming):
    # a stop signal is recorded and acted on at the first agreement point, not fatal, and
    # third-party chatter is held for the run's log instead of the console
    with StopSignals() as stop, ThirdPartyLog() as chatter:
        return run_entry(lambda: _train(args, stop, chatter))


def _train(args: argparse.Namespace, stop: StopSignals, chatter: ThirdPartyLog) -> int:
    cfg = load_config(args.config, args.overrides)
    # before importing torch and DeepSpeed: a layout this world cannot hold is refused in a
    # second, by every rank alike, before any of them waits for another
    cfg.validate_world(discover_launch_env().world_size)
    from megaret.parallel.agree import agree_or_raise
    from megaret.parallel.context import destroy_parallel_context
    from megaret.parallel.peers import lost_peer_of
    from megaret.train.run_lock import release_held
    from megaret.train.trainer import Trainer  # imports DeepSpeed

    try:
        trainer = Trainer(cfg, stop=stop)
        try:
            logs, rank = Path(cfg.run.dir) / "logs", trainer.ctx.rank
            agree_or_raise(trainer.ctx, lambda: chatter.attach(logs, rank), everywhere=True)
            if trainer.start.finished:  # nothing to do is done (exit 0): e.g. a requeue after the end
                if trainer.ctx.rank == 0:
                    print(f"already trained to step {trainer.step} of {cfg.train.steps} in {cfg.run.dir}: "
                          "nothing to do (raise train.steps to train on)", flush=True)
            else:
                trainer.train()
        finally:
            trainer.close()
    except Exception as exc:
        lost = lost_peer_of(exc)  # a collective lost a rank, host or link: one line naming it
        if lost is None:
            raise
        raise lost from exc
    finally:
        release_held()  # also the lock of a Trainer that failed while being built
        destroy_parallel_context()
    return 0


if __name__ == "__main__":
    sys.exit(main())
