"""Export a training checkpoint as one consolidated fp32 state dict, or as a Hugging Face model.

    python -m megaret.export --checkpoint DIR --out FILE
    python -m megaret.export --checkpoint DIR --format hf --out OUT [--tokenizer tokenizer.json]
    python -m megaret.export --checkpoint DIR --format safetensors --out OUT

DIR is a checkpoint (run.dir/checkpoints/step_NNNNNNN), a checkpoints/ directory or a run
directory (then its newest checkpoint that verifies); it is consolidated by
`megaret.checkpoint.consolidate` (TP shards merged, PP stages merged, weights_only reads). FILE
is a ``torch.save`` dict {name: fp32 tensor} (plus megatron's ``_extra_state`` entries, None)
that ``RetNet(...).load_state_dict`` accepts in one process (same config; ``torch.load(FILE,
weights_only=True)``); FILE.json holds the resolved config and the step.

--format hf writes a directory OUT that ``AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(OUT)`` load; --format safetensors a
directory of consolidated weights (model.safetensors), config.yaml and tokenizer.json
(megaret/hf/write.py). The tokenizer is --tokenizer, else the run's (data.tokenizer or its shards').

Every format writes the fp32 master weights (from the ZeRO-1/2 optimizer shards: exact for bf16
runs too; a ZeRO-0 bf16 run has none to read and exports its bf16 weights cast up, as its
.json / export.json says). ZeRO-3 checkpoints (parameters partitioned over DP) are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from megaret.checkpoint.consolidate import export_weights, weights_source
from megaret.entry import run_entry
from megaret.errors import UserError
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
    state, manifest, cfg = export_weights(checkpoint)
    model = cfg.model
    n = sum(t.numel() for t in state.values() if torch.is_tensor(t))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    except BaseException:  # a full disk or Ctrl-C leaves no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    meta = {"step": manifest["trainer"]["step"], "tokens_seen": manifest["trainer"]["tokens_seen"],
            "arch": model.arch, "parameters": n, "weights": weights_source(manifest),
            "config": manifest["config"]}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, checkpoints/ or run directory")
    parser.add_argument("--out", required=True, help="the .pt file (--format pt) or directory to write")
    parser.add_argument("--format", choices=("pt", "hf", "safetensors"), default="pt")
    parser.add_argument("--tokenizer", help="tokenizer.json for hf / safetensors (default: the run's)")
    args = parser.parse_args(argv)
    if args.format != "pt":
        from megaret.hf.write import export_dir

        with quiet_third_party():  # DeepSpeed's import-time warning would land on stdout
            out, meta = run_entry(lambda: export_dir(args.checkpoint, args.out, args.format, args.tokenizer))
        if "tokenizer_warning" in meta:
            print(meta["tokenizer_warning"], file=sys.stderr)
        print(f"wrote {out}: {meta['parameters']} parameters ({meta['weights']}, model.arch={meta['arch']}, "
              f"step {meta['step']}, format {args.format})")
        return 0
    with quiet_third_party():  # DeepSpeed's import-time warning would land on stdout
        path = run_entry(lambda: export(args.checkpoint, args.out))
    meta = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
    print(f"wrote {path}: {meta['parameters']} parameters (fp32, model.arch={meta['arch']}, "
          f"step {meta['step']})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
