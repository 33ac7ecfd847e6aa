"""From a run's :class:`~megaret.config.Config` to a verified, rank-sharded loader.

The trainer calls :func:`build_loader` once per split on every rank with its *data-parallel* rank
and size (tensor/pipeline peers pass the same values and get the same batches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megaret.data.errors import DataError
from megaret.data.loader import TokenLoader
from megaret.data.shards import open_split

DEFAULT_CACHE = Path.home() / ".cache" / "megaret" / "data"


def cache_dir(cfg: Any) -> Path:
    """``data.cache_dir`` or ~/.cache/megaret/data."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else DEFAULT_CACHE


def resolve_manifests(cfg: Any) -> list[str]:
    """Manifest locations of ``data.paths``, or of the embedded default corpus (built on first use)."""
    if cfg.data.paths:
        return list(cfg.data.paths)
    from megaret.data.default_corpus import ensure_default_shards

    path = ensure_default_shards(
        cache_dir(cfg),
        cfg.model.vocab_size,
        cfg.data.seq_length,
        small=cfg.data.default_corpus == "small",
        mode=cfg.data.packing,
    )
    return [str(path)]


def build_loader(
    cfg: Any, dp_rank: int, dp_size: int, split: str = "train", num_workers: int | None = None
) -> TokenLoader:
    """Verified loader for ``split`` ("train" shuffled by train.seed, "valid" in fixed order).

    Raises :class:`DataError` (one line, naming the file) for missing/corrupt shards, a tokenizer that
    differs from the shards', a vocabulary larger than ``model.vocab_size`` or a seq_length mismatch.
    Verified shards are stamped under ``<cache>/verified``: a restart, or a rank opening after
    another on the same machine, does not hash them again.
    """
    d = cfg.data
    sets = [
        open_split(
            loc, split, tokenizer=d.tokenizer, on_corrupt=d.on_corrupt, cache_dir=cache_dir(cfg) / "remote",
            stamp_dir=cache_dir(cfg) / "verified",
        )
        for loc in resolve_manifests(cfg)
    ]
    for s in sets:
        vocab = s.manifest["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise DataError(
                f"{s.location}: tokenizer has {vocab} ids but model.vocab_size={cfg.model.vocab_size}; "
                f"set model.vocab_size >= {vocab}"
            )
        if s.sample_tokens - 1 != d.seq_length:
            raise DataError(
                f"{s.location} was built with seq_length {s.sample_tokens - 1}, data.seq_length="
                f"{d.seq_length}; rebuild with --seq-length {d.seq_length} or change data.seq_length"
            )
    return TokenLoader(
        sets, micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=cfg.train.seed, weights=d.weights, stateful=d.packing == "segments",
        num_workers=d.num_workers if num_workers is None else num_workers, shuffle=split == "train",
    )  # fmt: skip
