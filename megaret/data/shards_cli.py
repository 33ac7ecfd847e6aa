"""Tokenize text into WebDataset token shards + manifest.json.

    python data_tools/build_shards.py --input PATH [PATH ...] [--input ...] --output DIR \\
        [--seq-length 2048] [--vocab-size 32000 | --tokenizer tokenizer.json] [--mode packed|segments] \\
        [--valid-fraction 0.01] [--samples-per-shard N] [--name NAME --license TEXT] [--text-key text] \\
        [--on-binary error|skip] [--eos-token TOKEN --bos-token TOKEN]
    python data_tools/build_shards.py --default-corpus small|full --output DIR [...]

An input is a file, a folder of files, a glob ('data/*.parquet') or a Hugging Face dataset saved with
save_to_disk: .txt/.md/.rst/.py (one document), .jsonl/.json (one {"text": ...} per line), .parquet,
.arrow, .csv (one document per row of column --text-key), each also as .gz/.zst/.xz/.bz2.
--tokenizer takes any Hugging Face tokenizer.json; --eos-token/--bos-token name its special tokens.
Without --tokenizer a byte-level BPE of --vocab-size is trained on the training documents first.
--valid-fraction must be in (0, 1); a split that ends up empty anyway is warned about. Files of
other suffixes in a folder are skipped; a binary file (NUL bytes, or over 1% of its bytes not
UTF-8) is refused, or skipped with --on-binary skip; the summary counts and names skipped files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megaret.data.corpus import ON_BINARY, Source
from megaret.data.shards import build_shards
from megaret.entry import run_entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="extend", nargs="+", default=[],
                    help="files, folders, globs or saved datasets (several after one --input, or repeated)")
    ap.add_argument("--name", action="extend", nargs="+", default=[],
                    help="source name per input, in order (default: basename)")
    ap.add_argument(
        "--license", action="extend", nargs="+", default=[], help="license per input (in the manifest)"
    )
    ap.add_argument(
        "--default-corpus", choices=("small", "full"), help="the embedded stdlib + Gutenberg corpus"
    )
    ap.add_argument("--output", required=True, help="new directory for shards, tokenizer.json, manifest.json")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one)")
    ap.add_argument("--mode", choices=("packed", "segments"), default="packed")
    ap.add_argument(
        "--valid-fraction", type=float, default=0.01, help="share of documents held out, in (0, 1)"
    )
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--samples-per-shard", type=int, default=None)
    ap.add_argument("--text-key", default="text", help="JSON field or table column holding the text")
    ap.add_argument("--eos-token", help="--tokenizer's end-of-document token (default: found by name)")
    ap.add_argument("--bos-token", help="--tokenizer's begin-of-document token (default: by name, else eos)")
    ap.add_argument(
        "--on-binary", choices=ON_BINARY, default="error",
        help="a binary input file: stop with an error naming it (default) or skip and count it",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if not (args.default_corpus or args.input):
        ap.error("give --input PATH (repeatable) or --default-corpus small|full")
    t0 = time.time()
    manifest = run_entry(lambda: _build(args))
    m = json.loads(manifest.read_text())
    for split, info in m["splits"].items():
        print(
            f"{split}: {info['documents']} documents, {info['samples']} samples, {info['tokens']} tokens, "
            f"{len(info['shards'])} shards"
        )
    for line in skipped_lines(m):
        print(line)
    print(f"wrote {manifest} in {time.time() - t0:.1f}s (vocab {m['tokenizer']['vocab_size']}, {m['dtype']})")
    return 0


def skipped_lines(manifest: dict, shown: int = 5) -> list[str]:
    """One line per source that skipped files: the count by reason, the first few names, "and N more"."""
    lines = []
    for src in manifest["sources"]:
        info = src.get("skipped_files") or {}
        n = info.get("count", 0)
        if not n:
            continue
        reasons = ", ".join(f"{c} {why}" for why, c in info["reasons"].items())
        names = info["first"][:shown]
        more = f" and {n - len(names)} more" if n > len(names) else ""
        lines.append(f"skipped {n} files of {src['name']} ({reasons}): {', '.join(names)}{more}")
    return lines


def _sources(args: argparse.Namespace) -> list[Source]:
    if args.default_corpus:
        from megaret.data.default_corpus import default_sources

        return default_sources(Path(args.output).parent / ".megaret-cache", args.default_corpus == "small")
    sources = []
    for i, path in enumerate(args.input):
        name = args.name[i] if i < len(args.name) else Path(path).name
        lic = args.license[i] if i < len(args.license) else "unknown (user data)"
        sources.append(Source(name, str(Path(path).resolve()), lic))
    return sources


def _build(args: argparse.Namespace) -> Path:
    return build_shards(
        _sources(args), args.output, seq_length=args.seq_length, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, mode=args.mode, valid_fraction=args.valid_fraction,
        split_seed=args.split_seed, samples_per_shard=args.samples_per_shard, text_key=args.text_key,
        on_binary=args.on_binary, eos_token=args.eos_token, bos_token=args.bos_token, progress=True,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
