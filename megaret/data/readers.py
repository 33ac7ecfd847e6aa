"""Reading documents from files: a registry of readers by suffix, compression, folders, globs, datasets.

:func:`read_documents` maps one input (a file, a folder, a glob, or a Hugging Face ``datasets``
dataset saved with ``save_to_disk``) to its documents. Formats, by suffix (:data:`READERS`):

- ``.txt .md .rst .py``: the whole file is one document (a binary file is refused or skipped);
- ``.jsonl .json``: one JSON object per line, the text under ``text_key``;
- ``.parquet`` (pyarrow), ``.arrow`` (a ``datasets`` Arrow file), ``.csv`` (through ``datasets``):
  one document per row, the text in column ``text_key``;

each also compressed (:data:`COMPRESSIONS`: ``.gz .zst .xz .bz2``, e.g. ``x.jsonl.zst``). A folder is
walked in sorted order; its files of other suffixes are skipped and counted. A file named directly
is read by its suffix, or as text when the suffix is none of these (``notes.gz`` is gzipped text).
Document keys are ``name/relative path`` for a text file and ``name/relative path:N`` for the N-th
line (1-based) or row (0-based) of a file; under a glob the path is relative to its folder.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from megaret.data.corpus import ON_BINARY, Document, Skipped, binary_reason
from megaret.data.errors import DataError


@dataclass(frozen=True)
class ReadContext:
    """How one input is read: its name (the key prefix), the text field, what to do with binaries."""

    name: str
    text_key: str = "text"
    on_binary: str = "error"
    skipped: Skipped | None = None


# --------------------------------------------------------------------------------------------
# compression


def _open_zstd(path: Path) -> IO[bytes]:
    import zstandard

    fh = path.open("rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True,
                                                                        closefd=True))


#: compressed suffix -> a function opening the file as a stream of its decompressed bytes
COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {
    ".gz": lambda p: gzip.open(p, "rb"),
    ".zst": _open_zstd,
    ".zstd": _open_zstd,
    ".xz": lambda p: lzma.open(p, "rb"),
    ".bz2": lambda p: bz2.open(p, "rb"),
}


def split_suffix(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None): "a.jsonl.zst" -> (".jsonl", ".zst")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


@contextmanager
def _opened(path: Path, compression: str | None) -> Iterator[IO[bytes]]:
    """The file's (decompressed) bytes as a stream; a damaged compressed file is a DataError."""
    fh = COMPRESSIONS[compression](path) if compression else path.open("rb")
    try:
        yield fh
    except Exception as exc:  # gzip/lzma/bz2 raise OSError, EOFError or their own; zstandard its ZstdError
        if compression is None or isinstance(exc, DataError):
            raise
        raise DataError(f"input {path} is not a readable {compression} file ({exc}); re-compress it or "
                        "remove it from the input") from exc
    finally:
        fh.close()


# --------------------------------------------------------------------------------------------
# one file -> (key suffix, text) pairs


def read_text(path: Path, compression: str | None, rel: str, ctx: ReadContext) -> Iterator[tuple[str, str]]:
    """The whole file as one document (the few bytes that are not UTF-8 replaced)."""
    with _opened(path, compression) as fh:
        data = fh.read()
    why = binary_reason(data)
    if why is not None:
        if ctx.on_binary == "error":
            raise DataError(
                f"input {path} is not text ({why.removeprefix('binary: ')}); remove it from the input "
                "or pass --on-binary skip to skip and count such files"
            )
        if ctx.skipped is not None:
            ctx.skipped.add(rel, "binary")
        return
    yield "", data.decode("utf-8", errors="replace")


def read_jsonl(path: Path, compression: str | None, rel: str, ctx: ReadContext) -> Iterator[tuple[str, str]]:
    """One document per non-empty line: the string under ``text_key``."""
    key = ctx.text_key
    with _opened(path, compression) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{lineno}: not a JSON object with a string {key!r} field ({exc}); "
                    "fix the line or pass --text-key"
                ) from exc
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {key!r} is {type(text).__name__}, not a string")
            yield f":{lineno}", text


def _column_rows(what: str, columns: list[str], column_type: str, batches: Iterable[list[Any]],
                 key: str) -> Iterator[tuple[str, str]]:
    """(":row", text) of a table's text column (rows 0-based; null rows skipped)."""
    if key not in columns:
        raise DataError(f"{what} has no column {key!r} (columns: {', '.join(columns)}); "
                        "pass --text-key COLUMN")
    if "string" not in column_type:
        raise DataError(f"{what}: column {key!r} is {column_type}, not text; "
                        "pass --text-key with a text column")
    row = 0
    for batch in batches:
        for text in batch:
            if text is not None:
                yield f":{row}", text
            row += 1


def read_parquet(
    path: Path, compression: str | None, rel: str, ctx: ReadContext
) -> Iterator[tuple[str, str]]:
    """One document per row of column ``text_key`` (read in batches with pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if compression:
        raise DataError(f"input {path}: a compressed .parquet is not read; decompress it (parquet compresses "
                        "its own columns)")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"input {path} is not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    key = ctx.text_key
    kind = str(schema.field(key).type) if key in schema.names else ""
    batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=1024, columns=[key]))
    yield from _column_rows(f"input {path}", schema.names, kind, batches, key)


def _dataset_rows(ds: Any, what: str, key: str) -> Iterator[tuple[str, str]]:
    """(":row", text) of a ``datasets.Dataset``'s column ``key``."""
    columns = list(ds.column_names)
    if key not in columns:
        return _column_rows(what, columns, "", iter(()), key)
    kind = str(getattr(ds.features[key], "dtype", ds.features[key]))
    batches = (b[key] for b in ds.select_columns([key]).iter(batch_size=1024))
    return _column_rows(what, columns, kind, batches, key)


def read_arrow(path: Path, compression: str | None, rel: str, ctx: ReadContext) -> Iterator[tuple[str, str]]:
    """One document per row of a ``datasets`` Arrow file (``Dataset.from_file``)."""
    from datasets import Dataset

    if compression:
        raise DataError(f"input {path}: a compressed .arrow file is not read; decompress it")
    yield from _dataset_rows(Dataset.from_file(str(path)), f"input {path}", ctx.text_key)


def read_csv(path: Path, compression: str | None, rel: str, ctx: ReadContext) -> Iterator[tuple[str, str]]:
    """One document per row, loaded through ``datasets.load_dataset("csv")`` (compressed too)."""
    from datasets import load_dataset

    ds = load_dataset("csv", data_files=str(path), split="train")
    yield from _dataset_rows(ds, f"input {path}", ctx.text_key)


FileReader = Callable[[Path, "str | None", str, ReadContext], Iterator[tuple[str, str]]]
#: format suffix -> reader of one file; a folder reads the files whose suffix is here
READERS: dict[str, FileReader] = {
    **dict.fromkeys((".txt", ".md", ".rst", ".py"), read_text),
    **dict.fromkeys((".jsonl", ".json"), read_jsonl),
    ".parquet": read_parquet,
    ".arrow": read_arrow,
    ".csv": read_csv,
}


# --------------------------------------------------------------------------------------------
# datasets saved with save_to_disk


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def read_saved_dataset(path: Path, ctx: ReadContext) -> Iterator[tuple[str, str]]:
    """Rows of a saved dataset (a DatasetDict: its "train" split, or its only one)."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise DataError(f"dataset {path} has splits {', '.join(splits)} and none is 'train'; save "
                            "the split to train on alone (ds[SPLIT].save_to_disk) and pass that folder")
        ds = ds["train" if "train" in ds else splits[0]]
    yield from _dataset_rows(ds, f"dataset {path}", ctx.text_key)


# --------------------------------------------------------------------------------------------
# an input -> documents


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_root(pattern: str) -> Path:
    """The folder a glob's matches are named relative to: its parts before the first wildcard."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if _is_glob(p))]]
    return Path(*fixed) if fixed else Path(".")


def _walk(folder: Path) -> Iterator[Path]:
    """Files and saved datasets under ``folder``, depth first in sorted order (a dataset is not entered)."""
    for entry in sorted(folder.iterdir()):
        if is_saved_dataset(entry):
            yield entry
        elif entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _read_one(path: Path, rel: str, ctx: ReadContext, named: bool) -> tuple[bool, Iterator[tuple[str, str]]]:
    """(readable?, its (key suffix, text) pairs); ``named``: the input names this file itself."""
    if is_saved_dataset(path):
        return True, read_saved_dataset(path, ctx)
    fmt, compression = split_suffix(path)
    reader = READERS.get(fmt)
    if reader is None and not named:
        if ctx.skipped is not None:
            ctx.skipped.add(rel, f"unsupported suffix {''.join(path.suffixes[-2:]) or '(none)'}")
        return False, iter(())
    return True, (reader or read_text)(path, compression, rel, ctx)


def read_documents(
    path: str | Path,
    name: str | None = None,
    text_key: str = "text",
    on_binary: str = "error",
    skipped: Skipped | None = None,
) -> Iterator[Document]:
    """Documents of one input: a file, a folder (sorted, recursive), a glob or a saved dataset.

    Files a folder holds of other suffixes, and binary files under ``on_binary="skip"``, are
    recorded in ``skipped``. Empty documents are left out.
    """
    if on_binary not in ON_BINARY:
        raise DataError(f"on_binary={on_binary!r} is not one of {', '.join(ON_BINARY)}")
    text = str(path)
    if _is_glob(text) and not Path(text).exists():
        root = _glob_root(text)
        matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
        if not matches:
            raise DataError(f"input {text} matches no file; check the pattern (quote it so the shell leaves "
                            "it to megaret)")
        entries = [(m, m.relative_to(root).as_posix()) for m in matches if m.is_file() or is_saved_dataset(m)]
        entries += [(f, f.relative_to(root).as_posix()) for m in matches
                    if m.is_dir() and not is_saved_dataset(m) for f in _walk(m)]
        entries.sort(key=lambda e: Path(e[1]))
        p, named = root, False
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"input {p} does not exist; pass a folder, a glob or a file of a supported "
                            f"format ({' '.join(READERS)}, also {' '.join(COMPRESSIONS)}-compressed)")
        files = [p] if p.is_file() or is_saved_dataset(p) else list(_walk(p))
        entries = [(f, f.name if f == p else f.relative_to(p).as_posix()) for f in files]
        named = p.is_file() or is_saved_dataset(p)
    ctx = ReadContext(name or p.name, text_key, on_binary, skipped)
    found = False
    for f, rel in entries:
        readable, pairs = _read_one(f, rel, ctx, named)
        found |= readable
        for suffix, doc in pairs:
            if doc:
                yield Document(f"{ctx.name}/{rel}{suffix}", doc, ctx.name)
    if not found:
        raise DataError(f"input {text} holds no file of a supported format ({' '.join(READERS)}, also "
                        f"{' '.join(COMPRESSIONS)}-compressed, or a saved datasets folder)")
