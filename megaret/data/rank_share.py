"""Which items a data-parallel rank reads, epoch after epoch (shared by both batch schedules).

Epoch ``e`` orders a dataset's ``n`` items by a permutation seeded with ``(seed, *key, e)`` (or
keeps them in order when not shuffling); rank ``r`` of ``P`` reads positions ``r, r+P, r+2P, ...``
of it, ``n // P`` items. Every rank so reads the same count per epoch (no collective waits on a
rank that ran out) and the ranks never read the same item within an epoch. The packed schedule
applies this to samples (one share per blended dataset), the stateful one to whole documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankOrder:
    """How one data-parallel rank reads: its rank of dp_size, the seed, whether epochs shuffle."""

    dp_rank: int
    dp_size: int
    seed: int
    shuffle: bool = True


class RankShare:
    """Rank ``order.dp_rank``'s share of ``n`` items; ``item(k)`` is the k-th it reads (k spans epochs)."""

    def __init__(self, n: int, order: RankOrder, key: tuple[int, ...] = ()) -> None:
        self.n, self.order, self.key = n, order, key
        self.per_rank = n // order.dp_size  # items per epoch; 0: too few for the ranks (callers refuse)
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def epoch(self, k: int) -> int:
        """The epoch of this rank's k-th item."""
        return k // self.per_rank

    def item(self, k: int) -> int:
        epoch, j = divmod(k, self.per_rank)
        if epoch != self._epoch:
            o = self.order
            rng = np.random.default_rng([o.seed, *self.key, epoch])
            self._perm = rng.permutation(self.n) if o.shuffle else np.arange(self.n)
            self._epoch = epoch
        return int(self._perm[j * self.order.dp_size + self.order.dp_rank])
