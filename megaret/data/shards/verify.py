"""Verifying shards: fetch remote ones, check every shard's size and sha256 against the manifest.

Hashing every shard on every start is slow for a large corpus, so a verified shard gets a stamp
(:func:`verified_digest`) that stands in for the hash while the file is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from megaret.config.schema import OnCorrupt, choices
from megaret.data.errors import DataError
from megaret.data.shards.layout import is_remote, load_manifest, sha256_file, shard_location
from megaret.data.shards.reader import ShardInfo, ShardSet
from megaret.data.tokenizer import Tokenizer, tokenizer_sha256

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _fetch(loc: str, sha: str, cache_dir: Path) -> Path:
    """Copy a remote shard (URL or pipe:) into the cache, named by its expected hash."""
    import webdataset as wds

    if not (isinstance(sha, str) and SHA256_HEX.fullmatch(sha)):  # it names the cached file
        raise DataError(f"shard {loc}: its manifest sha256 {sha!r} is not 64 hex digits; rebuild the shards "
                        "with data_tools/build_shards.py")
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{sha}.tar"
    if dest.exists():
        return dest
    tmp = cache_dir / f"{sha}.tar.tmp-{os.getpid()}"
    try:
        with wds.gopen(loc, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except Exception as exc:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot fetch shard {loc}: {exc}") from exc
    except BaseException:  # Ctrl-C: no partial download stays in the cache folder
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def _stamp_path(stamp_dir: Path, local: Path) -> Path:
    return stamp_dir / f"{hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:32]}.json"


def _file_identity(local: Path) -> dict[str, int]:
    st = local.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}


def verified_digest(local: Path, expected: str, stamp_dir: Path | None = None) -> str:
    """The sha256 of a local shard, trusting a stamp left by an earlier verification.

    With ``stamp_dir``, a shard that once hashed to ``expected`` gets a stamp recording its
    size, mtime, inode and device; while all four are unchanged the stamp stands in for the
    hash, so restarts (and the other ranks of a node, once one has verified) do not read every
    shard again. Any write to the file changes its mtime, so a shard corrupted later is hashed
    (and caught) again.
    """
    if stamp_dir is not None:
        stamp = _stamp_path(stamp_dir, local)
        try:
            record = json.loads(stamp.read_text())
        except (OSError, ValueError):
            record = None
        if record == {"sha256": expected, **_file_identity(local)}:
            return expected
    digest = sha256_file(local)
    if stamp_dir is not None and digest == expected:
        try:
            tmp = stamp.with_suffix(f".tmp-{os.getpid()}")
            stamp_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"sha256": digest, **_file_identity(local)}))
            os.replace(tmp, stamp)
        except OSError as exc:  # a read-only cache only costs the next open a re-hash
            tmp.unlink(missing_ok=True)
            warnings.warn(f"cannot write the verification stamp {stamp}: {exc}", stacklevel=2)
    return digest


def _max_id(entry: dict, where: str) -> int | None:
    """The shard's largest token id from its manifest entry (None: built before it was recorded)."""
    value = entry.get("max_id")
    if value is not None and (type(value) is not int or value < 0):
        raise DataError(f"shard {where}: its manifest max_id {value!r} is not an id; rebuild the shards")
    return value


def open_split(
    location: str | Path,
    split: str = "train",
    *,
    tokenizer: str | Path | Tokenizer | None = None,
    on_corrupt: str = "error",
    cache_dir: str | Path | None = None,
    stamp_dir: str | Path | None = None,
) -> ShardSet:
    """Load a manifest, check its tokenizer, and verify every shard of ``split`` against its sha256.

    Missing shards and a tokenizer whose hash differs from the manifest's are always errors; a
    corrupt or truncated shard is an error, or with ``on_corrupt="skip"`` is left out with a
    warning (and listed in :attr:`ShardSet.skipped`). Remote shards are fetched to ``cache_dir``.
    ``stamp_dir``: where verifications are remembered (see :func:`verified_digest`); None
    hashes every shard.
    """
    if on_corrupt not in choices(OnCorrupt):
        raise DataError(f"on_corrupt={on_corrupt!r} is not one of {', '.join(choices(OnCorrupt))}")
    manifest, loc = load_manifest(location)
    if split not in manifest["splits"]:
        raise DataError(f"manifest {loc} has no split {split!r} (has {', '.join(manifest['splits'])})")
    if tokenizer is not None:
        path, sha = ((tokenizer.path, tokenizer.sha256) if isinstance(tokenizer, Tokenizer)
                     else tokenizer_sha256(tokenizer))
        if sha != manifest["tokenizer"]["sha256"]:
            raise DataError(
                f"tokenizer {path} (sha256 {sha[:12]}) does not match the one the shards of "
                f"{loc} were built with (sha256 {manifest['tokenizer']['sha256'][:12]}); "
                "use that tokenizer.json or rebuild"
            )
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "megaret" / "shards"
    entries = manifest["splits"][split]["shards"]
    wheres = [shard_location(loc, split, entry.get("name")) for entry in entries]  # all, before any is read
    shards, skipped = [], []
    for entry, where in zip(entries, wheres, strict=True):
        if is_remote(where):
            local = _fetch(where, entry["sha256"], cache)
        else:
            local = Path(where)
            if not local.is_file():
                raise DataError(f"shard {local} listed in {loc} is missing; restore it or rebuild the shards")
        size, digest = local.stat().st_size, None
        if size == entry["bytes"]:
            digest = verified_digest(local, entry["sha256"], Path(stamp_dir) if stamp_dir else None)
        if digest != entry["sha256"]:
            why = (
                f"is truncated or padded ({size} bytes, manifest says {entry['bytes']})"
                if digest is None
                else f"is corrupt (sha256 {digest[:12]} != manifest {entry['sha256'][:12]})"
            )
            if on_corrupt == "error":
                raise DataError(f"shard {where} {why}; restore it, rebuild, or set data.on_corrupt=skip")
            warnings.warn(f"skipping shard {where}: it {why} (data.on_corrupt=skip)", stacklevel=2)
            skipped.append(where)
            if is_remote(where):
                local.unlink(missing_ok=True)
            shards.append(ShardInfo(entry["name"], where, None, entry["samples"], entry["sha256"]))
            continue
        identity = tuple(_file_identity(local)[k] for k in ("size", "mtime_ns", "inode", "device"))
        shards.append(ShardInfo(entry["name"], where, str(local), entry["samples"], entry["sha256"],
                                size=entry["bytes"], max_id=_max_id(entry, where), identity=identity))
    return ShardSet(manifest, loc, split, shards, skipped)

