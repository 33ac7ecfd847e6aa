"""Token shards (WebDataset tars + manifest.json), one module per job:

- :mod:`~megaret.data.shards.layout`: the directory layout, packing modes and manifest
  (:func:`load_manifest`);
- :mod:`~megaret.data.shards.writer`: tokenizing documents into shards (:func:`build_shards`);
- :mod:`~megaret.data.shards.verify`: checking every shard of a split against the manifest's
  sha256 before use (:func:`open_split`, :func:`verified_digest`);
- :mod:`~megaret.data.shards.reader`: indexed reading of the verified shards (:class:`ShardSet`).
"""

from megaret.data.shards.layout import FORMAT, MANIFEST, MODES, SPLITS, VERSION, load_manifest, sha256_file
from megaret.data.shards.reader import ShardInfo, ShardSet, iter_manifest_tokens
from megaret.data.shards.verify import open_split, verified_digest
from megaret.data.shards.writer import build_shards

__all__ = [
    "FORMAT", "MANIFEST", "MODES", "SPLITS", "VERSION", "ShardInfo", "ShardSet", "build_shards",
    "iter_manifest_tokens", "load_manifest", "open_split", "sha256_file", "verified_digest",
]
