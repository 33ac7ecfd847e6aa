"""What a shard directory holds: its layout, the manifest, and where each shard lives.

Layout of a shard directory::

    manifest.json            format, mode, seq_length, dtype, tokenizer hash, sources, per-split shards
    tokenizer.json           the tokenizer the ids come from
    train-000000.tar ...     WebDataset tars; sample key "%09d" (numbered across the split) with two members:
        <key>.tok            (seq_length + 1) little-endian token ids (uint16/uint32), raw bytes
        <key>.json           {"starts": [...]} (packed) or {"doc": d, "seg": s, "n": valid} (segments)
    valid-000000.tar ...     the held-out documents, packed the same way

Two packing modes:

* ``packed``: documents joined by ``<eos>`` into one stream, cut into samples of ``seq_length + 1``
  tokens that overlap by one token (sample i covers stream[i*L : i*L + L + 1], so inputs/labels
  shift and every token is a label once). ``starts`` lists the positions in the sample where a
  document begins, for models that reset their state at boundaries.
* ``segments``: each document ``<bos> doc <eos>`` on its own, cut into segments of ``L + 1``
  tokens (overlapping by one), the last one padded; ``n`` is the number of real tokens. The
  manifest's ``doc_table`` gives each document's first sample and segment count, so a stateful
  loader reads a document in order.

Integrity: WebDataset does not detect a corrupt payload, so each shard's sha256 and size are
stored in the manifest; :func:`~megaret.data.shards.verify.open_split` checks every shard of a
split against them before any sample is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from megaret.config.schema import Packing, choices
from megaret.data.errors import DataError, existing_file

MANIFEST = "manifest.json"
FORMAT = "megaret-shards"
VERSION = 1
MODES = choices(Packing)  # data.packing
SPLITS = ("train", "valid")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def is_remote(loc: str) -> bool:
    return "://" in loc or loc.startswith("pipe:")


#: a shard name in a manifest: one plain file name (letters, digits, ``._-``; no leading dot or dash)
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def shard_location(manifest_loc: str, split: str, name: object) -> str:
    """Where shard ``name`` of ``split`` lives: beside the manifest at ``manifest_loc``.

    ``name`` comes from the manifest's contents, which may have been fetched from anywhere, so it
    must be a plain file name inside the manifest's own folder or base URL: no scheme (``pipe:``
    would run a shell command, ``file:``/``http:`` would leave the folder), no absolute path, no
    ``..``, no separators, nothing a shell or URL would interpret. Only the manifest location
    itself (``data.paths``, written by the user) may be a URL or a ``pipe:`` command whose trailing
    path is replaced by the name.
    """
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise DataError(
            f"manifest {manifest_loc} split {split!r} lists shard {name!r}: shard names in a manifest "
            "must be plain file names inside its folder; rebuild the shards with data_tools/build_shards.py"
        )
    return manifest_loc.rsplit("/", 1)[0] + "/" + name if "/" in manifest_loc else name


def load_manifest(location: str | Path) -> tuple[dict[str, Any], str]:
    """(manifest dict, its location) for a shard directory, a manifest.json path, a URL or a pipe: command."""
    loc = str(location)
    if not is_remote(loc):
        fix = "build shards with data_tools/build_shards.py or fix data.paths"
        p = existing_file(loc, MANIFEST, "manifest", fix)
        loc = str(p.resolve())
        raw = p.read_bytes()
    else:
        import webdataset as wds

        try:
            with wds.gopen(loc, "rb") as fh:
                raw = fh.read()
        except Exception as exc:  # noqa: BLE001 - any transport failure is reported the same way
            raise DataError(f"cannot read manifest {loc}: {exc}") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"manifest {loc} is not valid JSON ({exc}); rebuild the shards") from exc
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"manifest {loc} is not a {FORMAT} manifest; build it with data_tools/build_shards.py"
        )
    return manifest, loc

