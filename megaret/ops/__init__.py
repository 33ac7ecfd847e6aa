"""Retention math (pure PyTorch): parallel, chunkwise and recurrent forms, decoding step, decay schedules.

The chunk form on flash-linear-attention's kernel is megaret.ops.retention_fla (not imported here).
"""

from megaret.ops.decay import retnet_log_decay
from megaret.ops.retention import (
    check_log_decay,
    chunk_retention,
    parallel_retention,
    recurrent_retention,
    retention_step,
)

__all__ = [
    "check_log_decay",
    "chunk_retention",
    "parallel_retention",
    "recurrent_retention",
    "retention_step",
    "retnet_log_decay",
]
