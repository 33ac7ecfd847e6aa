"""Export a training checkpoint as one consolidated fp32 state dict.

    python -m megaret.export --checkpoint DIR --out FILE

DIR is a checkpoint (run.dir/checkpoints/step_NNNNNNN), a checkpoints/ directory or a run
directory (then its newest checkpoint that verifies). Every file is checked against the
manifest first. The per-rank DeepSpeed model files (``ds/mp_rank_XX_model_states.pt``, XX =
the TP x PP rank; the manifest maps it to (tp_rank, pp_rank) and each stored name to its
full-model name and TP partition dim) are read offline with weights_only=True; TP shards are
concatenated along their partition dim and PP stages merged. FILE is a ``torch.save`` dict
{name: fp32 tensor} (plus megatron's ``_extra_state`` entries, None) that
``RetNet(...).load_state_dict`` accepts in one process (same config; ``torch.load(FILE,
weights_only=True)``); FILE.json holds the resolved config and the step.

bf16 runs export their bf16 model weights cast to fp32 (not the fp32 optimizer masters).
ZeRO-3 checkpoints (parameters partitioned over DP) are not supported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from megaret.checkpoint.files import CheckpointError, resolve, verify
from megaret.checkpoint.safe import safe_load
from megaret.config import Config
from megaret.config.loader import apply_overrides, config_from_dict


def consolidate(checkpoint: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(full-model fp32 state dict, manifest) of a checkpoint."""
    ckpt = resolve(Path(checkpoint))
    manifest = verify(ckpt)
    lay = manifest["layout"]
    if lay["zero_stage"] >= 3:
        raise CheckpointError(f"{ckpt}: ZeRO-3 checkpoints partition the weights over data parallel; "
                              "export supports parallel.zero_stage <= 2")
    pieces: dict[str, dict[int, torch.Tensor]] = {}
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
            dims[name] = dim if lay["tensor"] > 1 else None
            value = module[key]  # a tensor, or megatron's _extra_state (None)
            pieces.setdefault(name, {})[where["tp_rank"]] = value.float() if torch.is_tensor(value) else value
    out = {}
    for name, parts in pieces.items():
        if dims[name] is None:
            value = parts[min(parts)]
            out[name] = value.clone() if torch.is_tensor(value) else value
        else:
            missing = set(range(lay["tensor"])) - set(parts)
            if missing:
                raise CheckpointError(f"{ckpt}: no TP rank {sorted(missing)} shard of {name}")
            out[name] = torch.cat([parts[r] for r in range(lay["tensor"])], dim=dims[name])
    return out, manifest


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


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    state, manifest = consolidate(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    meta = {"step": manifest["trainer"]["step"], "tokens_seen": manifest["trainer"]["tokens_seen"],
            "config": manifest["config"]}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, checkpoints/ or run directory")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out)
    except CheckpointError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    state = torch.load(path, weights_only=True)
    n = sum(t.numel() for t in state.values() if torch.is_tensor(t))
    print(f"wrote {path}: {len(state)} tensors, {n} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
