"""A training run's TensorBoard files: run.dir/tensorboard (x axis: the optimizer step) and
run.dir/tensorboard/by_tokens (a second run whose x axis is the tokens seen).

Written by one rank (`megaret.train.metrics.Metrics` holds the board):
- the step run: every step's ``train/*`` scalars, ``eval/*`` at each evaluation, and, when the
  run starts, the resolved config as text (tag ``config``, YAML) and as the hparams plugin's
  record (every field a dotted hparam, ``train/loss`` and ``eval/loss`` its metrics), both at the
  first step this run trains;
- the by_tokens run: ``by_tokens/train_loss`` and ``by_tokens/eval_loss`` against the tokens seen.

Resume: a run that starts at step s opens both writers with a purge marker (SummaryWriter's
``purge_step``) at the first step it writes, s + 1 (tokens: s * tokens per step + 1). TensorBoard
drops every point of earlier event files from there on, so the steps a run logged after its last
checkpoint before it died are replaced by the resumed run's, not doubled. (Without the marker the
Python loader keeps every point of every file: two points per step after each resume.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CONFIG_TAG = "config"
BY_TOKENS = "by_tokens"
HPARAM_METRICS = ("train/loss", "eval/loss")


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested config, each value a bool, int, float or str (what the hparams
    plugin takes): None becomes "null", lists and empty dicts their JSON."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = "null" if value is None else json.dumps(value)
    return out


def config_text(config: dict[str, Any]) -> str:
    """The config as YAML, indented four spaces: a code block in TensorBoard's markdown."""
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return "\n".join("    " + line for line in body.splitlines())


class Board:
    """The two SummaryWriters of a run that starts (trains its first step) after `start_step`."""

    def __init__(self, run_dir: str | Path, start_step: int, tokens_per_step: int,
                 config: dict[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = Path(run_dir) / "tensorboard"
        self.tokens_per_step = tokens_per_step
        self.first_step = start_step + 1
        self.steps = SummaryWriter(log_dir=str(root), purge_step=self.first_step)
        self.tokens = SummaryWriter(log_dir=str(root / BY_TOKENS),
                                    purge_step=start_step * tokens_per_step + 1)
        if config is not None:
            self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        """The config as text and as hparams, at the first step this run trains (a later start that
        resumes from the same checkpoint replaces them through the purge marker)."""
        from torch.utils.tensorboard.summary import hparams

        self.steps.add_text(CONFIG_TAG, config_text(config), self.first_step)
        exp, start, _end = hparams(flat_hparams(config), dict.fromkeys(HPARAM_METRICS, 0.0))
        writer = self.steps._get_file_writer()
        writer.add_summary(exp, self.first_step)
        writer.add_summary(start, self.first_step)

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.steps.add_scalar(f"{group}/{name}", value, step)

    def by_tokens(self, name: str, value: float, step: int) -> None:
        """`value` at the tokens seen after `step`, in the by_tokens run."""
        self.tokens.add_scalar(f"{BY_TOKENS}/{name}", value, step * self.tokens_per_step)

    def close(self) -> None:
        self.steps.close()
        self.tokens.close()
