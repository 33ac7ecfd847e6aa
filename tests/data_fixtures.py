"""Tiny corpora written by the data tests themselves (no downloads), built once per module."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megaret.data.corpus import Source
from megaret.data.shards import build_shards

WORDS = (
    "the of and to in is retention state model token block recurrent layer python def return "
    "import class self value key query decay chunk gate shard loader rank epoch seed"
).split()


def write_corpus(root: Path, n_txt: int = 40, n_jsonl: int = 30, seed: int = 0) -> list[Path]:
    """A folder of .txt documents and a .jsonl file of varied lengths (some long, some tiny)."""
    rng = random.Random(seed)
    folder = root / "texts"
    folder.mkdir(parents=True)
    for i in range(n_txt):
        n = rng.choice([5, 20, 60, 200, 600])
        words = " ".join(rng.choice(WORDS) for _ in range(n))
        (folder / f"doc{i:03d}.txt").write_text(f"Document {i}: {words}.\nÜnïcödé ✓ line {i}\n")
    jsonl = root / "more.jsonl"
    with jsonl.open("w") as fh:
        for i in range(n_jsonl):
            n = rng.choice([3, 30, 90, 300])
            fh.write(
                json.dumps({"text": f"Record {i} " + " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n"
            )
    return [folder, jsonl]


def build_tiny(
    root: Path,
    mode: str = "packed",
    seq_length: int = 16,
    tokenizer: str | None = None,
    samples_per_shard: int = 64,
    valid_fraction: float = 0.1,
    name: str = "tiny",
) -> Path:
    inputs = write_corpus(root / f"{name}-src")
    sources = [Source(f"{name}-{p.name}", str(p), "CC0") for p in inputs]
    return build_shards(
        sources,
        root / name,
        seq_length=seq_length,
        tokenizer=tokenizer,
        vocab_size=300,
        mode=mode,
        valid_fraction=valid_fraction,
        samples_per_shard=samples_per_shard,
        log=lambda *a: None,
    )


def loader_config(manifest: Path, tmp_path: Path, vocab_size: int = 384):
    """A one-layer RetNet config reading `manifest` (sequence 16, batch 2, no workers)."""
    from megaret.config import Config

    return Config.from_dict({
        "model": {"vocab_size": vocab_size, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                  "ffn_hidden_size": 64, "chunk_size": 8},
        "data": {"paths": [str(manifest)], "seq_length": 16, "num_workers": 0,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 2},
    })  # fmt: skip
