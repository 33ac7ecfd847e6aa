"""Loading a model for inference: a config with consolidated weights, or a training checkpoint.

Used by the `megaret.generate` and `megaret.evaluate` entry points (which add the flags with
`add_model_args` and turn the typed errors raised here into one line and an exit code).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megaret.checkpoint.upgrade import fuse_named
from megaret.config import Config, load_config
from megaret.data import Tokenizer, load_manifest, resolve_manifests
from megaret.data.vocab import resolve_vocab
from megaret.errors import UserError
from megaret.models.spec import arch_spec, build_model
from megaret.parallel.context import ParallelContext, build_parallel_context
from megaret.parallel.megatron_config import megatron_config


class InferenceError(UserError, ValueError):
    """The model cannot be loaded or run as asked (one-line message naming the fix)."""


def resolve_tokenizer(cfg: Config, explicit: str | None) -> Tokenizer:
    """--tokenizer, data.tokenizer, or the tokenizer saved beside the first shard manifest."""
    if explicit or cfg.data.tokenizer:
        return Tokenizer(explicit or cfg.data.tokenizer)
    manifest, loc = load_manifest(resolve_manifests(cfg)[0])
    info = manifest["tokenizer"]  # older manifests name no special tokens: found by name
    return Tokenizer(Path(loc).parent / info["file"], eos_token=info.get("eos_token"),
                     bos_token=info.get("bos_token"))


def load_weights(model: torch.nn.Module, path: str | Path | dict, what: str = "--weights") -> None:
    """A consolidated state dict (TP=1 layout; a torch.save file, loaded without unpickling code, a
    .safetensors file (`megaret.export --format safetensors`), or in memory)."""
    if isinstance(path, str | Path) and str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif isinstance(path, str | Path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = path
    # weights saved before projections were fused (RetNet's q/k/v/g) load with the fused names
    state = fuse_named(state, arch_spec(model.cfg.arch).fused_weights(model.cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        where = f"{what} {path}" if isinstance(path, str | Path) else what
        raise InferenceError(f"{where} does not fit model.arch={model.cfg.arch}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--config / --weights / --checkpoint and the trailing key=value overrides."""
    parser.add_argument("--config", help="a YAML under configs/ (optional with --checkpoint)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--weights", help="consolidated torch.save(model.state_dict()) file")
    src.add_argument("--checkpoint", help="a training checkpoint: step, checkpoints/ or run directory")


def tokenizer_warning(manifest: dict | None, tok: Tokenizer, explicit: str | None) -> str | None:
    """One warning line when `tok` is not the tokenizer the checkpoint (`manifest`) was trained with."""
    want = ((manifest or {}).get("identity") or {}).get("tokenizer")
    if want is None or want == tok.sha256:
        return None
    what = f"--tokenizer {explicit}" if explicit else f"the tokenizer {tok.path}"
    fix = "drop --tokenizer to use the run's" if explicit else "give the run's with --tokenizer"
    return (f"megaret: warning: {what} (sha256 {tok.sha256[:12]}) is not the one the checkpoint was trained "
            f"with (sha256 {want[:12]}): its token ids mean other text; {fix}")


def load_model(config: str | None = None, weights: str | None = None, checkpoint: str | None = None,
               overrides: Sequence[str] = ()) -> tuple[Config, torch.nn.Module, ParallelContext, dict | None]:
    """(cfg, model, ctx, the checkpoint's manifest or None) from a config (+ consolidated weights)
    or a checkpoint (+ overrides), in one process. Raises ConfigError, CheckpointError or
    InferenceError."""
    from megaret.checkpoint.consolidate import load_checkpoint

    state: Any = None
    manifest = None
    if checkpoint:
        if config:  # an explicit config wins over the manifest's
            state, _, manifest = load_checkpoint(checkpoint)
            cfg = load_config(config, overrides)
        else:
            state, cfg, manifest = load_checkpoint(checkpoint, overrides)
    elif config:
        cfg = load_config(config, overrides)
    else:
        raise InferenceError("give --config (with --weights or not) or --checkpoint")
    if cfg.parallel.tensor != 1 or cfg.parallel.pipeline != 1:
        raise InferenceError("inference runs one process: set parallel.tensor=1 parallel.pipeline=1")
    if cfg.model.vocab_size is None:  # the checkpoint's, as training fixed it; else from the data
        saved = ((manifest or {}).get("config") or {}).get("model") or {}
        if saved.get("vocab_size") is None:
            resolve_vocab(cfg)
        else:
            m = cfg.model
            m.vocab_size = saved["vocab_size"]
            m.tokenizer_vocab_size = m.tokenizer_vocab_size or saved.get("tokenizer_vocab_size")
            cfg.validate()
    ctx = build_parallel_context(1, 1, seed=cfg.train.seed)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).to(ctx.device)
    if state is not None:
        load_weights(model, state, f"--checkpoint {checkpoint}")
    elif weights:
        load_weights(model, weights)
    return cfg, model, ctx, manifest
