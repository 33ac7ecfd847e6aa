"""Weighted blending of datasets, as Megatron's BlendedDataset does it.

Sample ``i`` of the blended stream goes to the dataset whose share is furthest behind its target
(``argmax_d  w_d * (i + 1) - count_d``). Unlike random sampling, the proportions are exact at every
prefix (each count within 1 of ``w_d * i``) and the choice is deterministic, so the state to resume
is just the per-dataset counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from megaret.data.errors import DataError


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights summing to 1 (uniform when None)."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"blend weights {list(weights)} must be {n} non-negative numbers with a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


class Blender:
    """Deterministic greedy choice of the dataset of each next sample; ``counts`` is its state."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = list(weights)
        self.counts = [0] * len(self.weights)

    def next(self) -> int:
        """Dataset of the next sample (and count it)."""
        if len(self.weights) == 1:
            self.counts[0] += 1
            return 0
        pos = sum(self.counts) + 1
        best, best_err = 0, float("-inf")
        for d, w in enumerate(self.weights):
            err = w * pos - self.counts[d]
            if err > best_err:
                best, best_err = d, err
        self.counts[best] += 1
        return best
