"""Export a training checkpoint as one consolidated fp32 state dict.

    python -m megaret.export --checkpoint DIR --out FILE

DIR is a checkpoint (run.dir/checkpoints/step_NNNNNNN), a checkpoints/ directory or a run
directory (then its newest checkpoint that verifies); it is consolidated by
`megaret.checkpoint.consolidate` (TP shards merged, PP stages merged, weights_only reads). FILE
is a ``torch.save`` dict {name: fp32 tensor} (plus megatron's ``_extra_state`` entries, None)
that ``RetNet(...).load_state_dict`` accepts in one process (same config; ``torch.load(FILE,
weights_only=True)``); FILE.json holds the resolved config and the step.

bf16 runs export their bf16 model weights cast to fp32 (not the fp32 optimizer masters).
ZeRO-3 checkpoints (parameters partitioned over DP) are not supported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from megaret.checkpoint.consolidate import consolidate
from megaret.checkpoint.files import CheckpointError


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
