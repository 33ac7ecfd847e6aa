"""Where a data-parallel rank's batch comes from: a small protocol and a synthetic source.

The trainer asks `next_batch(step)` for this DP rank's share of the global batch; TP and PP
peers of a DP rank build the same source (same dp_rank) and so see the same tokens. The
streaming loader in megaret/data plugs in behind the same protocol.

A batch is a :class:`Batch`: tokens, labels, loss_mask (0 on padding: the loss averages over
the tokens it marks), and, when the source has them, doc_start (B, T) (input t begins a
document; packed mode) and reset (B,) (this slot starts a new document: zero its carried
recurrent state; stateful `data.packing=segments` mode). `tokens, labels = batch` still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64
    loss_mask: torch.Tensor  # (B, T) float, 1 where the label counts
    doc_start: torch.Tensor | None = None  # (B, T) bool: input t is a document's first token
    reset: torch.Tensor | None = None  # (B,) bool: slot starts a new document (stateful mode)

    @classmethod
    def of(cls, tokens: torch.Tensor, labels: torch.Tensor) -> Batch:
        """A batch whose every label counts."""
        return cls(tokens, labels, torch.ones(tokens.shape, dtype=torch.float32))

    def __iter__(self):  # `tokens, labels = batch`
        return iter((self.tokens, self.labels))

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.tokens, self.labels)[i]

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(move(self.tokens), move(self.labels), move(self.loss_mask), move(self.doc_start),
                     move(self.reset))

    def context_slice(self, size: int, rank: int) -> Batch:
        """Context-parallel rank `rank` of `size`: the contiguous slice rank of every sample along T
        (doc_start keeps its global meaning; reset (B,) concerns the sequence start and stays whole)."""
        if size == 1:
            return self
        T = self.tokens.shape[1]
        if T % size:
            raise ValueError(f"sequence length {T} is not divisible by parallel.context_parallel={size}")
        lo, hi = rank * T // size, (rank + 1) * T // size

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, lo:hi]

        return Batch(cut(self.tokens), cut(self.labels), cut(self.loss_mask), cut(self.doc_start), self.reset)

    def split(self, size: int) -> list[Batch]:
        """Micro-batches of `size` rows (in order)."""
        parts = {name: (None if t is None else t.split(size)) for name, t in vars(self).items()}
        n = len(parts["tokens"])
        return [Batch(**{name: (None if p is None else p[i]) for name, p in parts.items()}) for i in range(n)]


class BatchSource(Protocol):
    def next_batch(self, step: int) -> Batch:
        """This DP rank's share of optimizer step `step`'s global batch."""
        ...


class SyntheticBatches:
    """Deterministic token walks keyed by (seed, step, global sample index).

    Sample i of step s is a walk through a fixed random permutation of the vocabulary (the
    next token is a function of the current one, so loss falls) from a start drawn with
    seed (seed, s, i). DP rank r gets samples [r * B, (r + 1) * B) of the global batch, so
    any DP size sees the same global batch as one process. Negative steps are a held-out
    split (the trainer's evaluation draws steps -1, -2, ...): the same task, other samples.
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
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 1_000_003 + index) % 2**63)
        walk = [torch.randint(self.vocab, (), generator=gen)]
        for _ in range(self.seq):
            walk.append(self.next_of[walk[-1]])
        return torch.stack(walk)  # (T + 1,)

    def next_batch(self, step: int) -> Batch:
        rows = torch.stack([self._sample(step, self.first + i) for i in range(self.per_rank)])  # (B, T + 1)
        return Batch.of(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


class LoaderBatches:
    """This DP rank's share of each global batch, drawn from the streaming shard loader.

    The loader yields micro-batches of `train.micro_batch_size`; one optimizer step takes
    global_batch / dp of them, concatenated. Its position is the loader's state_dict.
    In stateful (segments) mode consecutive micro-batches are consecutive segments of the
    same slots, so the trainer carries recurrent state from one micro-batch to the next.
    """

    def __init__(self, loader: Any, per_rank_batch: int, micro_batch: int) -> None:
        if per_rank_batch % micro_batch:
            raise ValueError(f"per-rank batch {per_rank_batch} is not a multiple of micro batch {micro_batch}"
                             "; make train.global_batch_size a multiple of micro_batch_size * DP")
        self.loader = loader
        self.micro_per_step = per_rank_batch // micro_batch
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def restart(self) -> None:
        """Forget the open iterator (after the loader's position was changed)."""
        self._it = None

    def next_batch(self, step: int) -> Batch:
        if self._it is None:
            self._it = iter(self.loader)
        micro = [next(self._it) for _ in range(self.micro_per_step)]
        cat = {k: torch.cat([m[k] for m in micro]) for k in ("tokens", "labels", "loss_mask")}  # (B, T)
        extra = {k: torch.cat([m[k] for m in micro]) for k in ("doc_start", "reset") if k in micro[0]}
        return Batch(cat["tokens"], cat["labels"], cat["loss_mask"].float(), **extra)
