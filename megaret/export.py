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

from megaret.checkpoint.consolidate import checkpoint_config, consolidate
from megaret.checkpoint.files import CheckpointError
from megaret.entry import run_entry
from megaret.errors import UserError
from megaret.models.spec import arch_spec
from megaret.train.chatter import quiet_third_party


class ExportError(UserError, ValueError):
    """The export cannot be written where asked (one-line message naming the fix)."""


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write FILE and FILE.json; raises ExportError when FILE cannot be a file (checked before
    consolidating), CheckpointError otherwise (also when the consolidated weights do not hold the
    parameter count the arch's spec gives for the checkpoint's config)."""
    out = Path(out)
    if out.exists() and not out.is_file():
        kind = "a directory" if out.is_dir() else "not a regular file"
        raise ExportError(f"--out {out} is {kind}: give the path of the .pt file to write, e.g. "
                          f"{out / 'model.pt' if out.is_dir() else out.with_suffix('.pt')}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is not a directory")
    state, manifest = consolidate(checkpoint)
    model = checkpoint_config(manifest).model
    n = sum(t.numel() for t in state.values() if torch.is_tensor(t))
    expected = arch_spec(model.arch).param_count(model)
    if n != expected:
        raise CheckpointError(f"{checkpoint}: the consolidated weights hold {n} parameters, model.arch="
                              f"{model.arch} with the saved config has {expected}: the checkpoint does not "
                              "match its manifest")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    except BaseException:  # a full disk or Ctrl-C leaves no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    meta = {"step": manifest["trainer"]["step"], "tokens_seen": manifest["trainer"]["tokens_seen"],
            "arch": model.arch, "parameters": n, "config": manifest["config"]}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, checkpoints/ or run directory")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    with quiet_third_party():  # DeepSpeed's import-time warning would land on stdout
        path = run_entry(lambda: export(args.checkpoint, args.out))
    meta = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
    print(f"wrote {path}: {meta['parameters']} parameters (fp32, model.arch={meta['arch']}, "
          f"step {meta['step']})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
