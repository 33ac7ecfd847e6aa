"""From a run's :class:`~megaret.config.Config` to a verified, rank-sharded loader.

The trainer calls :func:`build_loader` once per split on every rank with its *data-parallel* rank
and size (tensor/pipeline peers pass the same values and get the same batches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megaret.data.errors import DataError
from megaret.data.loader import TokenLoader
from megaret.data.shards import ShardSet, load_manifest, open_split

DEFAULT_CACHE = Path.home() / ".cache" / "megaret" / "data"


def cache_dir(cfg: Any) -> Path:
    """``data.cache_dir`` or ~/.cache/megaret/data."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else DEFAULT_CACHE


def resolve_manifests(cfg: Any) -> list[str]:
    """Manifest locations of ``data.paths``, or of the embedded default corpus (built on first use)."""
    if cfg.data.paths:
        return list(cfg.data.paths)
    from megaret.data.default_corpus import ensure_default_shards
    from megaret.data.vocab import default_corpus_vocab

    path = ensure_default_shards(
        cache_dir(cfg),
        default_corpus_vocab(cfg),
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
    differs from the shards', token ids outside ``model.vocab_size`` (:func:`check_vocab`), a
    seq_length mismatch, or (``split="valid"``) a validation split too small to evaluate on
    (:func:`check_eval_split`).
    Verified shards are stamped under ``<cache>/verified``: a restart, or a rank opening after
    another on the same machine, does not hash them again.
    """
    d = cfg.data
    locations = resolve_manifests(cfg)
    if split == "valid":
        for loc in locations:
            check_eval_split(loc, cfg, dp_size)
    sets = [
        open_split(
            loc, split, tokenizer=d.tokenizer, on_corrupt=d.on_corrupt, cache_dir=cache_dir(cfg) / "remote",
            stamp_dir=cache_dir(cfg) / "verified",
        )
        for loc in locations
    ]
    for s in sets:
        check_vocab(s, cfg.model.vocab_size)
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


def check_vocab(s: ShardSet, vocab_size: int) -> None:
    """Every id in the verified shards of ``s`` must be below ``vocab_size`` (model.vocab_size).

    Each shard's largest id is recorded at build time (``max_id`` in its manifest entry), so this
    costs no read; the tokenizer's declared size is checked too. Under tensor parallelism an id
    beyond the vocabulary would not fail: each rank's embedding masks the ids outside its slice, so
    the token would silently become a zero vector. Manifests from before ``max_id`` was recorded
    are checked by the tokenizer's size only (scanning every token at open costs a full read).
    """
    for sh in s.shards:
        if sh.local is not None and sh.max_id is not None and sh.max_id >= vocab_size:
            raise DataError(
                f"shard {sh.location} holds token id {sh.max_id}, outside model.vocab_size={vocab_size} "
                f"(ids 0..{vocab_size - 1}); set model.vocab_size >= {sh.max_id + 1} or rebuild the shards "
                "with a tokenizer that fits the model"
            )
    vocab = s.manifest["tokenizer"]["vocab_size"]
    if vocab > vocab_size:
        raise DataError(
            f"{s.location}: tokenizer has {vocab} ids but model.vocab_size={vocab_size}; "
            f"set model.vocab_size >= {vocab}, or model.vocab_size=null to size it from the tokenizer"
        )


def check_eval_split(location: str, cfg: Any, dp_size: int) -> None:
    """The manifest at ``location`` has a validation split every data-parallel rank can read from.

    Checked from the manifest alone (before any shard is hashed), when the trainer is built, so a
    dataset without one stops before step 1 instead of at the first evaluation.
    """
    manifest, loc = load_manifest(location)
    info = manifest["splits"].get("valid")
    segments = cfg.data.packing == "segments"
    unit = "documents" if segments else "samples"
    n = 0 if info is None else len(info.get("doc_table") or []) if segments else info["samples"]
    if n >= dp_size:
        return
    what = "no validation split" if info is None else f"{n} validation {unit}"
    need = f" for {dp_size} data-parallel ranks" if n else ""
    raise DataError(
        f"manifest {loc} has {what}{need}, and evaluation is on (train.eval_steps="
        f"{cfg.train.eval_steps}, train.eval_interval={cfg.train.eval_interval}); rebuild the shards with "
        "--valid-fraction > 0 (e.g. 0.01) and enough documents, or set train.eval_interval=0 to train "
        "without evaluation"
    )
