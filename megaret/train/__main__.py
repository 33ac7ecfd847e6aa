"""Train a model (model.arch: retnet, transformer, sliding or brt):
python -m megaret.train --config configs/tiny.yaml [section.key=value ...]

Under torchrun every rank runs this; the layout comes from parallel.* and the world size.
Writes run.dir/config.yaml (the resolved config) and run.dir/tensorboard/. Rank 0 holds
run.dir/megaret.lock while it runs (one trainer per run.dir). A run.dir already trained to
train.steps says so and exits 0, its config.yaml untouched.
"""

from __future__ import annotations

import argparse
import sys

from megaret.config import load_config
from megaret.entry import run_entry
from megaret.parallel.context import destroy_parallel_context
from megaret.train.run_lock import release_held
from megaret.train.trainer import Trainer


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML under configs/ (or a run dir)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    return run_entry(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)
        try:
            if trainer.start.finished:  # nothing to do is done (exit 0): e.g. a requeue after the end
                if trainer.ctx.rank == 0:
                    print(f"already trained to step {trainer.step} of {cfg.train.steps} in {cfg.run.dir}: "
                          "nothing to do (raise train.steps to train on)", flush=True)
            else:
                trainer.train()
        finally:
            trainer.close()
    finally:
        release_held()  # also the lock of a Trainer that failed while being built
        destroy_parallel_context()
    return 0


if __name__ == "__main__":
    sys.exit(main())
