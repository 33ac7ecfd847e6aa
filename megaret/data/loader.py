"""Resumable, rank-sharded batch loader over verified token shards.

Sampling (packed mode): dataset ``d`` (N_d samples) is shuffled once per epoch by
``(seed, d, epoch)``; data-parallel rank ``r`` of ``P`` takes positions ``r, r+P, r+2P, ...`` of the
permutation, N_d // P of them, so every rank has the same count (no collective hang) and ranks are
disjoint (:mod:`megaret.data.rank_share`). Several datasets are interleaved by weight
(:mod:`megaret.data.blend`). The stream never ends: when a rank has read its share of an epoch it
continues with the next epoch's permutation.

Position and workers: batch ``i`` of the stream is a pure function of (seed, rank, i). Loader
worker ``w`` of ``W`` loads batches ``i ≡ w (mod W)`` and torch's DataLoader returns them in order,
so the batches do not depend on ``W``. The main process advances a metadata-only copy of the
schedule per batch it hands out; that is the state saved in a checkpoint (batches prefetched but not
consumed are not counted). The state is the same on every DP rank (it counts positions, not
samples), so the trainer may save it from any rank; resuming with another worker count or another
micro-batch size (packed mode) gives exactly the samples the uninterrupted run would have seen.

Tensor-/pipeline-parallel peers pass the same ``dp_rank``/``dp_size`` and so see the same batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from megaret.data.blend import Blender, normalize_weights
from megaret.data.errors import DataError
from megaret.data.rank_share import RankOrder, RankShare
from megaret.data.shards import ShardSet
from megaret.data.stateful import StatefulSchedule

STATE_VERSION = 1


class PackedSchedule:
    """Per-batch list of (dataset, sample index) for one data-parallel rank."""

    def __init__(
        self, sizes: Sequence[int], weights: Sequence[float] | None, batch_size: int, order: RankOrder
    ) -> None:
        self.sizes = [int(n) for n in sizes]
        self.shares = [RankShare(n, order, key=(d,)) for d, n in enumerate(self.sizes)]
        self.per_rank = [s.per_rank for s in self.shares]
        if 0 in self.per_rank:
            d = self.per_rank.index(0)
            raise DataError(
                f"dataset {d} has {self.sizes[d]} samples, fewer than the {order.dp_size} data-parallel "
                "ranks; add data or use fewer ranks"
            )
        self.weights = normalize_weights(weights, len(self.sizes))
        self.batch_size = batch_size
        self.blender = Blender(self.weights)

    def _sample(self, d: int, k: int) -> int:
        """Index of the k-th sample this rank reads from dataset d."""
        return self.shares[d].item(k)

    def next_batch(self) -> list[tuple[int, int]]:
        refs = []
        for _ in range(self.batch_size):
            d = self.blender.next()
            refs.append((d, self._sample(d, self.blender.counts[d] - 1)))
        return refs

    def epochs(self) -> list[int]:
        return [s.epoch(c) for s, c in zip(self.shares, self.blender.counts, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.blender.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = [int(c) for c in state["counts"]]
        if len(counts) != len(self.sizes):
            raise DataError(
                f"loader state has {len(counts)} datasets, this run blends {len(self.sizes)}; "
                "resume with the same data.paths"
            )
        self.blender.counts = counts


def _collate_packed(samples: list[tuple[np.ndarray, dict[str, Any]]]) -> dict[str, torch.Tensor]:
    arr = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.int64))  # (B, L+1)
    B, L = arr.shape[0], arr.shape[1] - 1
    doc_start = torch.zeros(B, L, dtype=torch.bool)  # (B, L): input t begins a document
    for b, (_, meta) in enumerate(samples):
        starts = [s for s in meta["starts"] if s < L]
        doc_start[b, starts] = True
    return {
        "tokens": arr[:, :-1],
        "labels": arr[:, 1:],
        "loss_mask": torch.ones(B, L),
        "doc_start": doc_start,
    }


def _collate_segments(
    samples: list[tuple[np.ndarray, dict[str, Any]]], refs: list[Any]
) -> dict[str, torch.Tensor]:
    arr = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.int64))  # (B, L+1)
    L = arr.shape[1] - 1
    n = torch.tensor([s[1]["n"] for s in samples])  # (B,) real tokens per sample
    loss_mask = (torch.arange(L)[None, :] < (n[:, None] - 1)).float()  # (B, L): labels that are real
    return {
        "tokens": arr[:, :-1], "labels": arr[:, 1:], "loss_mask": loss_mask,
        "reset": torch.tensor([r.reset for r in refs]),  # (B,) zero this slot's state before the step
        "doc": torch.tensor([r.doc for r in refs]), "segment": torch.tensor([r.seg for r in refs]),
    }  # fmt: skip


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches from a schedule snapshot; worker w of W loads batches i = w (mod W)."""

    def __init__(self, sets: list[ShardSet], schedule: Any, stateful: bool) -> None:
        self.sets, self.schedule, self.stateful = sets, schedule, stateful

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        sched = copy.deepcopy(self.schedule)
        i = 0
        while True:
            refs = sched.next_batch()
            if i % nw == w:
                if self.stateful:
                    yield _collate_segments([self.sets[0].read_global(r.index) for r in refs], refs)
                else:
                    yield _collate_packed([self.sets[d].read_usable(k) for d, k in refs])
            i += 1


def _unwrapped(exc: DataError) -> DataError:
    """A worker's DataError with its own one-line message (torch re-raises it in the main process
    with the worker's whole traceback as the message)."""
    text = str(exc)
    if not text.startswith("Caught DataError in DataLoader worker"):
        return exc
    last = text.rstrip().rsplit("\n", 1)[-1]
    return DataError(last.partition("DataError: ")[2] or last)


class TokenLoader:
    """Infinite, resumable stream of micro-batches for one data-parallel rank.

    Packed batches: ``tokens``/``labels`` (B, L) int64, ``loss_mask`` (B, L) float, ``doc_start``
    (B, L) bool (input t is the first token of a document). Stateful batches (``stateful=True``,
    shards built with ``--mode segments``): also ``reset`` (B,) bool, ``doc`` and ``segment`` (B,);
    ``loss_mask`` is 0 on the padding of a document's last segment.

    Iterating starts at the current position; :meth:`state_dict` reflects the batches handed out.
    """

    def __init__(
        self,
        sets: Sequence[ShardSet],
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        stateful: bool = False,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not sets:
            raise DataError("no datasets given to the loader")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        hashes = {s.manifest["tokenizer"]["sha256"] for s in sets}
        lengths = {s.sample_tokens for s in sets}
        if len(hashes) > 1 or len(lengths) > 1:
            raise DataError(
                f"blended datasets {[s.location for s in sets]} differ in tokenizer or seq_length; "
                "build them with the same tokenizer.json and --seq-length"
            )
        self.sets = list(sets)
        self.stateful = stateful
        self.num_workers = num_workers
        self.micro_batch_size = micro_batch_size
        self.seed, self.dp_size = seed, dp_size
        order = RankOrder(dp_rank, dp_size, seed, shuffle)
        if stateful:
            if len(self.sets) != 1:
                raise DataError(
                    "stateful loading reads one dataset; give one path (blending is packed-mode only)"
                )
            self.schedule: Any = StatefulSchedule(self.sets[0].doc_table(), micro_batch_size, order)
        else:
            for s in self.sets:
                if s.mode != "packed":
                    raise DataError(
                        f"{s.location} holds {s.mode!r} shards; packed loading needs --mode packed "
                        "(or set the loader to stateful)"
                    )
            sizes = [s.num_samples for s in self.sets]
            self.schedule = PackedSchedule(sizes, weights, micro_batch_size, order)
        self.batches_consumed = 0

    @property
    def seq_length(self) -> int:
        return self.sets[0].sample_tokens - 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        stream = _BatchStream(self.sets, copy.deepcopy(self.schedule), self.stateful)
        if self.num_workers > 0:
            it = iter(
                torch.utils.data.DataLoader(
                    stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=4
                )
            )
        else:
            it = iter(stream)
        try:
            for batch in it:
                self.schedule.next_batch()  # metadata only: keeps the saved position = batches handed out
                self.batches_consumed += 1
                yield batch
        except DataError as exc:
            raise _unwrapped(exc) from None

    def state_dict(self) -> dict[str, Any]:
        """Position of the stream; identical on all DP ranks."""
        return {
            "version": STATE_VERSION,
            "stateful": self.stateful,
            "seed": self.seed,
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
            "datasets": [s.location for s in self.sets],
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; call before iterating."""
        for key in ("version", "stateful", "seed", "dp_size"):
            if state.get(key) != getattr(self, key, STATE_VERSION if key == "version" else None):
                raise DataError(
                    f"loader state has {key}={state.get(key)!r}, this run has "
                    f"{getattr(self, key, STATE_VERSION)!r}; resume with the same data settings"
                )
        if self.stateful and state["micro_batch_size"] != self.micro_batch_size:
            raise DataError(
                f"stateful loader state has {state['micro_batch_size']} slots, this run "
                f"train.micro_batch_size={self.micro_batch_size}; keep the micro-batch size"
            )
        self.schedule.load_state_dict(state["schedule"])

    def stats(self) -> dict[str, float]:
        """Counters for logs/TensorBoard."""
        epochs = [self.schedule.epoch()] if self.stateful else self.schedule.epochs()
        out = {
            "data/corrupt_shards_skipped": float(sum(len(s.skipped) for s in self.sets)),
            "data/epoch": float(max(epochs)),
        }
        if not self.stateful:
            for d, c in enumerate(self.schedule.blender.counts):
                out[f"data/samples_dataset{d}"] = float(c)
        return out
