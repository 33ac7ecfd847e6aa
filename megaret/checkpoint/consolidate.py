"""A training checkpoint as one full-model fp32 state dict, offline (no process group).

Every file is checked against the manifest first. The per-rank DeepSpeed model files
(``ds/mp_rank_XX_model_states.pt``, XX = the TP x PP rank; the model part's manifest entry maps
it to (tp_rank, pp_rank) and each stored name to its full-model name and TP partition dim) are
read with weights_only=True; TP shards are merged (`megaret.checkpoint.merge.merge_tp`) and PP
stages by name. The result (plus megatron's ``_extra_state`` entries, None) is what
``RetNet(...).load_state_dict`` accepts in one process with the same config.

The model files hold the weights in the run's precision: a bf16 run's are bf16, cast to fp32.
With ``masters=True`` (what `megaret.export` writes) the fp32 master weights come from the ZeRO-1/2
optimizer shards instead (`megaret.checkpoint.reshard.training_state`), exact under bf16 too (a bf16
run's BF16_Optimizer shards, at ZeRO-0 too); fp32 ZeRO-0 keeps no partitioned masters to read, its
model files' weights are the fp32 weights (`weights_source` says which). ZeRO-3 checkpoints
(parameters partitioned over DP) are refused. A checkpoint saved with separate projections that
the model now fuses (RetNet's q/k/v/g) comes out with the fused names (`megaret.checkpoint.upgrade`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megaret.checkpoint.files import CheckpointError, resolve, verify
from megaret.checkpoint.legacy import model_layout
from megaret.checkpoint.merge import merge_named
from megaret.checkpoint.reshard import holds_partitions, training_state
from megaret.checkpoint.safe import safe_load
from megaret.checkpoint.upgrade import fuse_named
from megaret.config import Config
from megaret.config.loader import apply_overrides, config_from_dict
from megaret.models.spec import arch_spec

log = logging.getLogger("megaret.checkpoint")


def consolidate(checkpoint: str | os.PathLike[str], attempts: int = 3, masters: bool = False
                ) -> tuple[dict[str, Any], dict]:
    """(full-model fp32 state dict, manifest) of a checkpoint, a checkpoints/ or a run directory
    (then its newest checkpoint that verifies); with `masters`, the optimizer's fp32 masters
    where the checkpoint holds them (`weights_source`).

    A live run may prune the checkpoint chosen from a run directory while it is read: then the
    newest valid one is chosen again (up to `attempts` times), said in one warning line."""
    source = Path(checkpoint)
    ckpt = resolve(source)
    for attempt in range(attempts):
        try:
            return _consolidate(ckpt, masters)
        except (CheckpointError, OSError):
            if ckpt == source or attempt + 1 == attempts or ckpt.is_dir() and verify_quietly(ckpt):
                raise  # an explicit checkpoint, or one that is still there: the error is real
            again = resolve(source)
            if again == ckpt:
                raise
            log.warning("megaret: warning: %s disappeared while it was read (a live run pruned it?); reading "
                        "%s instead", ckpt, again)
            ckpt = again
    raise AssertionError("unreachable")


def verify_quietly(ckpt: Path) -> bool:
    try:
        verify(ckpt)
    except CheckpointError:
        return False
    return True


def weights_source(manifest: dict, masters: bool = True) -> str:
    """Which weights `consolidate(..., masters)` gives for a checkpoint with this manifest."""
    lay = model_layout(manifest)
    if masters and holds_partitions(lay["zero_stage"], lay.get("precision")):
        return "fp32 optimizer masters"
    if lay.get("precision") == "bf16":
        return "bf16 model weights cast to fp32"
    return "fp32 model weights"


def _consolidate(ckpt: Path, masters: bool = False) -> tuple[dict[str, Any], dict]:
    manifest = verify(ckpt)
    lay = model_layout(manifest)
    if lay["zero_stage"] >= 3:
        raise CheckpointError(f"{ckpt}: ZeRO-3 checkpoints partition the weights over data parallel; "
                              "export supports parallel.zero_stage <= 2")
    pieces: dict[str, dict[int, Any]] = {}  # full name -> tp_rank -> tensor (or _extra_state)
    dims: dict[str, int | None] = {}
    for mp, where in sorted(lay["mp_ranks"].items()):
        path = ckpt / lay["deepspeed_dir"] / f"mp_rank_{mp}_model_states.pt"
        module = safe_load(path)["module"]
        names = lay["params"][mp]
        unknown = sorted(set(module) - set(names))
        if unknown:
            raise CheckpointError(f"{path} holds {unknown[:3]} that the manifest does not map")
        for key, (name, dim) in names.items():
            if key not in module:
                raise CheckpointError(f"{path} lacks {key}")
            value = module[key]
            dims[name] = dim
            pieces.setdefault(name, {})[where["tp_rank"]] = value.float() if torch.is_tensor(value) else value
    full = merge_named(pieces, dims, lay["tensor"], ckpt)
    fused = _fused_weights(manifest)
    if masters and holds_partitions(lay["zero_stage"], lay.get("precision")):
        fp32 = training_state(ckpt, lay, {k for k, v in full.items() if torch.is_tensor(v)}).params
        return fuse_named({k: fp32[k] if torch.is_tensor(v) else v for k, v in full.items()}, fused), manifest
    cut = lay["tensor"] > 1
    # an uncut tensor is one rank's, as loaded: copy it out of the file's storage
    return fuse_named({k: v.clone() if torch.is_tensor(v) and not (cut and dims[k] is not None) else v
                       for k, v in full.items()}, fused), manifest


def _fused_weights(manifest: dict) -> tuple:
    """The fused projections of the checkpoint's model (its arch spec's), () without a saved config."""
    if not manifest.get("config"):
        return ()
    model = checkpoint_config(manifest).model
    return arch_spec(model.arch).fused_weights(model)


def export_weights(checkpoint: str | os.PathLike[str]) -> tuple[dict[str, Any], dict, Config]:
    """(the fp32 masters as a full-model state dict, manifest, one-process config) of a checkpoint,
    a checkpoints/ or a run directory: what `megaret.export` writes in every format. Raises
    CheckpointError, also when the weights do not hold the parameter count the arch's spec gives
    for the saved config."""
    state, manifest = consolidate(checkpoint, masters=True)
    cfg = checkpoint_config(manifest)
    model = cfg.model
    n = sum(t.numel() for t in state.values() if torch.is_tensor(t))
    expected = arch_spec(model.arch).param_count(model)
    if n != expected:
        raise CheckpointError(f"{checkpoint}: the consolidated weights hold {n} parameters, model.arch="
                              f"{model.arch} with the saved config has {expected}: the checkpoint does not "
                              "match its manifest")
    return state, manifest, cfg


def checkpoint_config(manifest: dict, overrides: Sequence[str] = ()) -> Config:
    """The resolved config a checkpoint was trained with, laid out for one process (consolidated
    weights: parallel.tensor=pipeline=1), then `overrides` (``section.key=value``)."""
    one = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null",
           "parallel.sequence_parallel=false"]
    return config_from_dict(apply_overrides(manifest["config"], [*one, *overrides]))


def load_checkpoint(
    checkpoint: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], Config, dict]:
    """(consolidated fp32 state dict, one-process config, manifest) of a checkpoint, a
    checkpoints/ or a run directory, in memory (megaret.generate / megaret.evaluate --checkpoint)."""
    state, manifest = consolidate(checkpoint)
    return state, checkpoint_config(manifest, overrides), manifest
