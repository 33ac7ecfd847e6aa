"""Input formats (issue 14, item 3): parquet, datasets (save_to_disk, Arrow, CSV), compressed text, globs.

Every file is written here with the real library (pyarrow, datasets, gzip, zstandard, lzma, bz2) and
read back through megaret/data/readers.py: the same documents, in a stable order, with stable keys.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil

import pytest

from megaret.data.corpus import Skipped
from megaret.data.errors import DataError
from megaret.data.readers import read_documents

DOCS = [f"Document {i}: the retention state {'of the model ' * (i % 5)}Ünïcödé ✓ {i}\n" for i in range(12)]


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _write_all(root):
    """The 12 documents split over every format; returns {file or folder name: its documents}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset, DatasetDict

    root.mkdir(parents=True)
    parts = {}
    (root / "a.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    parts["a.txt.gz"] = DOCS[:1]
    (root / "b.txt.xz").write_bytes(lzma.compress(DOCS[1].encode()))
    parts["b.txt.xz"] = DOCS[1:2]
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(DOCS[2:4])))
    parts["c.jsonl.zst"] = DOCS[2:4]
    (root / "d.jsonl.bz2").write_bytes(bz2.compress(_jsonl(DOCS[4:6])))
    parts["d.jsonl.bz2"] = DOCS[4:6]
    pq.write_table(pa.table({"id": [6, 7, 8], "text": [DOCS[6], None, DOCS[8]]}), root / "e.parquet",
                   row_group_size=1)  # several row groups; a null row is no document
    parts["e.parquet"] = [DOCS[6], DOCS[8]]
    Dataset.from_dict({"text": DOCS[9:10]}).save_to_disk(str(root / "f_saved"))
    parts["f_saved"] = DOCS[9:10]
    held_out = Dataset.from_dict({"text": ["held-out test text"]})
    DatasetDict({"train": Dataset.from_dict({"text": DOCS[10:11]}), "test": held_out}).save_to_disk(
        str(root / "g_dict"))
    parts["g_dict"] = DOCS[10:11]  # a DatasetDict gives its train split
    import csv

    with (root / "h.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["id", "text"], [11, DOCS[11]]])
    parts["h.csv"] = DOCS[11:12]
    (root / "skip.png").write_bytes(b"\x89PNG\0\0")
    return parts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats") / "in"
    return root, _write_all(root)


def test_every_format_in_a_folder(corpus) -> None:
    root, parts = corpus
    skipped = Skipped()
    docs = list(read_documents(root, "src", skipped=skipped))
    assert [d.text for d in docs] == [t for name in sorted(parts) for t in parts[name]]
    assert sorted(d.text for d in docs) == sorted(DOCS[:7] + DOCS[8:])  # row 7 is null
    assert skipped.files == [("skip.png", "unsupported suffix .png")]
    keys = [d.key for d in docs]
    assert len(set(keys)) == len(keys)
    assert keys[:3] == ["src/a.txt.gz", "src/b.txt.xz", "src/c.jsonl.zst:1"]  # a text file; a jsonl line
    assert "src/e.parquet:0" in keys and "src/e.parquet:2" in keys and "src/f_saved:0" in keys  # rows
    assert [d.key for d in read_documents(root, "src")] == keys  # the same order and keys every time


def test_each_file_alone_and_globs(corpus, tmp_path) -> None:
    root, parts = corpus
    for name, texts in parts.items():
        assert [d.text for d in read_documents(root / name)] == texts, name
    # a glob: keys relative to its folder, so moving the files keeps them
    got = list(read_documents(str(root / "*.jsonl.*"), "g"))
    assert [d.key for d in got] == ["g/c.jsonl.zst:1", "g/c.jsonl.zst:2", "g/d.jsonl.bz2:1",
                                    "g/d.jsonl.bz2:2"]
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert [d.key for d in read_documents(str(moved / "*.jsonl.*"), "g")] == [d.key for d in got]
    assert [d.text for d in read_documents(str(root / "**" / "*.parquet"))] == parts["e.parquet"]
    # a text file named directly is text whatever its suffix; compressed too
    (tmp_path / "notes.gz").write_bytes(gzip.compress(b"plain words"))
    assert [d.text for d in read_documents(tmp_path / "notes.gz")] == ["plain words"]


def test_format_errors_name_the_fix(corpus, tmp_path) -> None:
    root, _ = corpus
    with pytest.raises(DataError, match=r"has no column 'body' \(columns: id, text\); pass --text-key"):
        list(read_documents(root / "e.parquet", text_key="body"))
    with pytest.raises(DataError, match=r"column 'id' is int64, not text"):
        list(read_documents(root / "e.parquet", text_key="id"))
    with pytest.raises(DataError, match="has no column 'body'"):
        list(read_documents(root / "f_saved", text_key="body"))
    whole = gzip.compress(" ".join(DOCS * 20).encode())
    (tmp_path / "bad.txt.gz").write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(DataError, match=r"bad\.txt\.gz is not a readable \.gz file"):
        list(read_documents(tmp_path / "bad.txt.gz"))
    with pytest.raises(DataError, match="matches no file"):
        list(read_documents(str(tmp_path / "*.parquet")))
    (tmp_path / "bin.txt.gz").write_bytes(gzip.compress(b"\0\1\2" * 50))
    with pytest.raises(DataError, match=r"bin\.txt\.gz is not text \(holds NUL bytes\)"):
        list(read_documents(tmp_path / "bin.txt.gz"))
