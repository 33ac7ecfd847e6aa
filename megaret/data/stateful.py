"""Stateful (document-ordered) batch schedule: each batch slot reads whole documents in order.

For recurrent training (RetNet recurrent/chunk state carried across steps, Block-Recurrent
Transformer), slot ``b`` of step ``t+1`` must hold the segment that follows slot ``b`` of step ``t``
in the same document. Each data-parallel rank gets a disjoint share of the documents (an equal
count per epoch, in a seeded per-epoch order); a slot that finishes a document takes the rank's
next one and raises its ``reset`` flag, so the model zeroes that slot's state. The stream never
ends (epochs roll over), so ranks with different document lengths still step together.

The schedule is a pure function of (document table, seed, rank, step) and only touches metadata,
so its state is the step count alone and resuming replays it in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megaret.data.errors import DataError
from megaret.data.rank_share import RankOrder, RankShare


@dataclass(frozen=True)
class SegmentRef:
    """One slot's sample: the document's ``seg``-th segment at sample ``index`` (all-shard coordinates)."""

    index: int
    doc: int  # document ordinal in the (usable) document table
    seg: int
    reset: bool  # first segment of a document: reset this slot's recurrent state


class StatefulSchedule:
    """Per-step list of :class:`SegmentRef`, one per slot, for one data-parallel rank."""

    def __init__(self, doc_table: list[tuple[int, int]], batch_size: int, order: RankOrder) -> None:
        self.table = doc_table
        self.share = RankShare(len(doc_table), order)
        self.per_rank = self.share.per_rank
        if self.per_rank == 0:
            raise DataError(
                f"{len(doc_table)} documents cannot give each of {order.dp_size} data-parallel ranks one; "
                "add documents or use fewer ranks"
            )
        self.batch_size = batch_size
        self.reset_state()

    def reset_state(self) -> None:
        self.steps = 0
        self.taken = 0  # documents this rank has started
        self.slots: list[list[int]] = [[-1, 0, 0] for _ in range(self.batch_size)]  # [doc, next seg, n seg]

    def epoch(self) -> int:
        return self.share.epoch(max(self.taken - 1, 0))

    def next_batch(self) -> list[SegmentRef]:
        refs = []
        for slot in self.slots:
            if slot[1] >= slot[2]:
                doc = self.share.item(self.taken)
                self.taken += 1
                slot[:] = [doc, 0, self.table[doc][1]]
            doc, seg = slot[0], slot[1]
            refs.append(SegmentRef(self.table[doc][0] + seg, doc, seg, seg == 0))
            slot[1] += 1
        self.steps += 1
        return refs

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset_state()
        for _ in range(int(state["steps"])):
            self.next_batch()
