"""Data pipeline: corpora with provenance, BPE tokenizer, WebDataset token shards, resumable loader.

Trainer entry points: :func:`build_loader` (from a Config), :func:`ensure_default_shards`,
:class:`TokenLoader` (``state_dict``/``load_state_dict``/``stats``), :class:`DataError`.
"""

from megaret.data.default_corpus import ensure_default_shards
from megaret.data.errors import DataError
from megaret.data.from_config import build_loader, resolve_manifests
from megaret.data.loader import TokenLoader
from megaret.data.shards import build_shards, load_manifest, open_split
from megaret.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "TokenLoader",
    "Tokenizer",
    "build_loader",
    "build_shards",
    "ensure_default_shards",
    "load_manifest",
    "open_split",
    "resolve_manifests",
    "train_tokenizer",
]
