"""Loader: equal/disjoint ranks, exact resume (also with other worker counts), stateful slots, blending."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from megaret.data.errors import DataError
from megaret.data.loader import TokenLoader
from megaret.data.shards import open_split
from tests.data_fixtures import build_tiny


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("lp"), "packed")


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("ls"), "segments", seq_length=8)


def _loader(manifest, **kw):
    sets = [open_split(m, "train") for m in (manifest if isinstance(manifest, list) else [manifest])]
    args = dict(micro_batch_size=2, dp_rank=0, dp_size=1, seed=7)
    args.update(kw)
    return TokenLoader(sets, **args)


def _rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b["tokens"]]


def test_batch_shapes(packed) -> None:
    b = next(iter(_loader(packed)))
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == b["doc_start"].shape == (2, 16)
    assert b["tokens"].dtype == torch.int64 and b["doc_start"].dtype == torch.bool
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])  # labels are inputs shifted by one


@pytest.mark.parametrize("dp", [2, 3])
def test_ranks_equal_and_disjoint(packed, dp) -> None:
    s = open_split(packed, "train")
    n = s.num_samples
    per_rank = n // dp
    seen = []
    for r in range(dp):
        ld = TokenLoader([s], micro_batch_size=1, dp_rank=r, dp_size=dp, seed=3)
        seen.append([ld.schedule.next_batch()[0][1] for _ in range(per_rank)])
        assert len(set(seen[-1])) == per_rank  # one epoch: no repeats within a rank
    assert all(len(x) == per_rank for x in seen)  # equal counts
    union = set().union(*map(set, seen))
    assert len(union) == per_rank * dp  # disjoint
    # and the actual tokens differ across ranks for the first batches
    rows = [
        _rows(itertools.islice(TokenLoader([s], micro_batch_size=4, dp_rank=r, dp_size=dp, seed=3), 5))
        for r in range(dp)
    ]
    assert not set(rows[0]) & set(rows[1])


def test_tp_peers_same_batches(packed) -> None:
    a = _rows(itertools.islice(_loader(packed, dp_rank=1, dp_size=2), 10))
    b = _rows(itertools.islice(_loader(packed, dp_rank=1, dp_size=2), 10))
    assert a == b


def test_shuffle_depends_on_seed_and_epoch(packed) -> None:
    ld = _loader(packed, micro_batch_size=1)
    n = ld.schedule.per_rank[0]
    e0 = [ld.schedule.next_batch()[0][1] for _ in range(n)]
    e1 = [ld.schedule.next_batch()[0][1] for _ in range(n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1  # epochs roll over, reshuffled
    other = _loader(packed, micro_batch_size=1, seed=8)
    assert [other.schedule.next_batch()[0][1] for _ in range(n)] != e0


@pytest.mark.parametrize(("workers_before", "workers_after", "step"), [(0, 2, 37), (2, 1, 203), (1, 0, 5)])
def test_resume_exact(packed, workers_before, workers_after, step) -> None:
    """Interrupt after `step` batches, resume with another worker count: the next 50 batches match."""
    reference = list(itertools.islice(_loader(packed, num_workers=0), step + 50))
    first = _loader(packed, num_workers=workers_before)
    it = iter(first)
    for _ in range(step):
        next(it)
    state = first.state_dict()
    del it
    resumed = _loader(packed, num_workers=workers_after)
    resumed.load_state_dict(state)
    after = list(itertools.islice(resumed, 50))
    for a, b in zip(after, reference[step:], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert resumed.state_dict()["schedule"] == _advance_state(packed, step + 50)


def _advance_state(packed, n):
    ld = _loader(packed)
    for _ in range(n):
        ld.schedule.next_batch()
    return ld.schedule.state_dict()


def test_resume_rejects_other_layout(packed) -> None:
    state = _loader(packed).state_dict()
    with pytest.raises(DataError, match="dp_size"):
        _loader(packed, dp_size=2).load_state_dict(state)


def test_stateful_slots_in_order(segments) -> None:
    s = open_split(segments, "train")
    table = s.doc_table()
    for dp in (1, 2):
        docs_per_rank = []
        for r in range(dp):
            ld = TokenLoader(
                [s], micro_batch_size=3, dp_rank=r, dp_size=dp, seed=5, stateful=True, num_workers=1
            )
            expect_seg = [None] * 3
            started = []
            for b in itertools.islice(ld, 120):
                for slot in range(3):
                    doc, seg, reset = int(b["doc"][slot]), int(b["segment"][slot]), bool(b["reset"][slot])
                    assert reset == (seg == 0)
                    if reset:
                        prev = expect_seg[slot]
                        assert prev is None or prev[1] == table[prev[0]][1]  # previous doc was finished
                        started.append(doc)
                    else:
                        assert expect_seg[slot] == (doc, seg)  # next segment of the same document
                    expect_seg[slot] = (doc, seg + 1)
                    n_real = int(b["loss_mask"][slot].sum())
                    assert n_real == (8 if seg < table[doc][1] - 1 else n_real) and n_real >= 1
            per_epoch = len(table) // dp
            docs_per_rank.append(started[:per_epoch])
            assert len(set(started[:per_epoch])) == min(per_epoch, len(started))
        if dp == 2:
            assert not set(docs_per_rank[0]) & set(docs_per_rank[1])


def test_stateful_resume(segments) -> None:
    s = open_split(segments, "train")
    ref = list(
        itertools.islice(
            TokenLoader([s], micro_batch_size=2, dp_rank=0, dp_size=1, seed=5, stateful=True), 80
        )
    )
    ld = TokenLoader([s], micro_batch_size=2, dp_rank=0, dp_size=1, seed=5, stateful=True, num_workers=2)
    it = iter(ld)
    for _ in range(30):
        next(it)
    state = ld.state_dict()
    del it
    ld2 = TokenLoader([s], micro_batch_size=2, dp_rank=0, dp_size=1, seed=5, stateful=True)
    ld2.load_state_dict(state)
    for a, b in zip(itertools.islice(ld2, 50), ref[30:], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_blend_proportions(tmp_path, packed) -> None:
    other = build_tiny(tmp_path, "packed", tokenizer=str(packed.parent / "tokenizer.json"), name="b")
    ld = _loader([packed, other], micro_batch_size=4, weights=[0.75, 0.25])
    picks = Counter(d for _ in range(250) for d, _ in ld.schedule.next_batch())
    assert picks == {0: 750, 1: 250}
    assert ld.stats()["data/samples_dataset1"] == 250.0
    ld = _loader([packed, other], micro_batch_size=1, weights=[2, 1])
    first = [ld.schedule.next_batch()[0][0] for _ in range(30)]
    assert all(abs(first[:i].count(0) - 2 * i / 3) <= 1 for i in range(1, 31))  # exact at every prefix
    b = next(iter(_loader([packed, other], weights=[1, 1])))
    assert b["tokens"].shape == (2, 16)


def test_blend_rejects_other_tokenizer(tmp_path, packed) -> None:
    other = build_tiny(tmp_path, "packed", name="c")  # trains its own tokenizer on different text order
    import json

    spec = json.loads((other.parent / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zz"] = 9999
    (other.parent / "tokenizer.json").write_text(json.dumps(spec))
    m = json.loads(other.read_text())
    m["tokenizer"]["sha256"] = "0" * 64
    other.write_text(json.dumps(m))
    with pytest.raises(DataError, match="differ in tokenizer"):
        _loader([packed, other])


def test_skip_counter_in_stats(tmp_path, packed) -> None:
    import shutil
    import warnings

    dst = tmp_path / "c"
    shutil.copytree(packed.parent, dst)
    (dst / "train-000000.tar").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ld = TokenLoader(
            [open_split(dst, "train", on_corrupt="skip")], micro_batch_size=2, dp_rank=0, dp_size=1, seed=1
        )
    assert ld.stats()["data/corrupt_shards_skipped"] == 1.0
    assert next(iter(ld))["tokens"].shape == (2, 16)
