"""Where a data-parallel rank's batch comes from: a small protocol and a synthetic source.

The trainer asks `next_batch(step)` for this DP rank's share of the global batch; TP and PP
peers of a DP rank build the same source (same dp_rank) and so see the same tokens. The
streaming loader in megaret/data plugs in behind the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch


class BatchSource(Protocol):
    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, T), labels (B, T)) of optimizer step `step` for this DP rank."""
        ...


class SyntheticBatches:
    """Deterministic token walks keyed by (seed, step, global sample index).

    Sample i of step s is a walk through a fixed random permutation of the vocabulary (the
    next token is a function of the current one, so loss falls) from a start drawn with
    seed (seed, s, i). DP rank r gets samples [r * B, (r + 1) * B) of the global batch, so
    any DP size sees the same global batch as one process.
    """

    def __init__(self, vocab: int, seq_length: int, global_batch: int, dp_size: int, dp_rank: int,
                 seed: int) -> None:
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by data-parallel size {dp_size}")
        self.vocab, self.seq, self.seed = vocab, seq_length, seed
        self.per_rank = global_batch // dp_size
        self.first = dp_rank * self.per_rank
        self.next_of = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))

    def _sample(self, step: int, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + index)
        walk = [torch.randint(self.vocab, (), generator=gen)]
        for _ in range(self.seq):
            walk.append(self.next_of[walk[-1]])
        return torch.stack(walk)  # (T + 1,)

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([self._sample(step, self.first + i) for i in range(self.per_rank)])  # (B, T + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class LoaderBatches:
    """This DP rank's share of each global batch, drawn from the streaming shard loader.

    The loader yields micro-batches of `train.micro_batch_size`; one optimizer step takes
    global_batch / dp of them, concatenated. Its position is the loader's state_dict.
    """

    def __init__(self, loader: Any, per_rank_batch: int, micro_batch: int) -> None:
        if per_rank_batch % micro_batch:
            raise ValueError(f"per-rank batch {per_rank_batch} is not a multiple of micro batch {micro_batch}"
                             "; make train.global_batch_size a multiple of micro_batch_size * DP")
        self.loader = loader
        self.micro_per_step = per_rank_batch // micro_batch
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        micro = [next(self._it) for _ in range(self.micro_per_step)]
        tokens = torch.cat([m["tokens"] for m in micro])  # (B, T)
        labels = torch.cat([m["labels"] for m in micro])  # (B, T)
        return tokens, labels
