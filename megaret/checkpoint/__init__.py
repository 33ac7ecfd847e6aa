"""Checkpoint files: atomic directories with sha256 manifests, and code-free loading."""

from megaret.checkpoint.files import (
    LATEST,
    MANIFEST,
    CheckpointError,
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
    "LATEST", "MANIFEST", "CheckpointError", "install_safe_loading", "list_checkpoints", "publish",
    "read_manifest", "resolve", "safe_load", "select_newest_valid", "step_name", "verify",
]
