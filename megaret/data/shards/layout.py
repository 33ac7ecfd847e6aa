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


def join_location(base: str, name: str) -> str:
    """Shard location next to the manifest (works for paths, URLs and trailing-path pipe: commands)."""
    if is_remote(name) or name.startswith("/"):
        return name
    return base.rsplit("/", 1)[0] + "/" + name if "/" in base else name


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

