"""Checkpoints: atomic directories with sha256 manifests, code-free loading (here); the manager of
stateful parts (manager, parts, model), resharding (reshard), offline consolidation
(consolidate), tensor-parallel merging (merge, gather) and format-1 reading (legacy)."""

from megaret.checkpoint.files import (
    LATEST,
    MANIFEST,
    CheckpointError,
    FormatError,
    list_checkpoints,
    publish,
    read_manifest,
    resolve,
    select_newest_valid,
    step_name,
    verify,
)
from megaret.checkpoint.safe import install_safe_loading, safe_load

__all__ = [
    "LATEST", "MANIFEST", "CheckpointError", "FormatError", "install_safe_loading", "list_checkpoints",
    "publish", "read_manifest", "resolve", "safe_load", "select_newest_valid", "step_name", "verify",
]
