"""Token shards: writing (WebDataset tar + manifest.json), verification, indexed reading.

Layout of a shard directory::

    manifest.json            format, mode, seq_length, dtype, tokenizer hash, sources, per-split shards
    tokenizer.json           the tokenizer the ids come from
    train-000000.tar ...     WebDataset tars; sample key "%09d" (numbered across the split) with two members:
        <key>.tok            (seq_length + 1) little-endian token ids (uint16/uint32), raw bytes
        <key>.json           {"starts": [...]} (packed) or {"doc": d, "seg": s, "n": valid} (segments)
    valid-000000.tar ...     the held-out documents, packed the same way

Two packing modes:

* ``packed``: documents joined by ``<eos>`` into one stream, cut into samples of ``seq_length + 1``
  tokens that overlap by one token (sample i covers stream[i*L : i*L + L + 1], so inputs/labels
  shift and every token is a label once). ``starts`` lists the positions in the sample where a
  document begins, for models that reset their state at boundaries.
* ``segments``: each document ``<bos> doc <eos>`` on its own, cut into segments of ``L + 1``
  tokens (overlapping by one), the last one padded; ``n`` is the number of real tokens. The
  manifest's ``doc_table`` gives each document's first sample and segment count, so a stateful
  loader reads a document in order.

Integrity: WebDataset does not detect a corrupt payload, so each shard's sha256 is stored in the
manifest and checked before the shard is used (:func:`verify_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megaret.data.corpus import Document, Source, split_keys
from megaret.data.errors import DataError
from megaret.data.tokenizer import TOKENIZER_FILE, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "megaret-shards"
VERSION = 1
MODES = ("packed", "segments")
SPLITS = ("train", "valid")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# writing


class _SplitWriter:
    """Packs one split's documents into samples and writes them with webdataset.ShardWriter."""

    def __init__(
        self,
        out: Path,
        split: str,
        mode: str,
        seq_length: int,
        dtype: str,
        tok: Tokenizer,
        samples_per_shard: int,
    ) -> None:
        import webdataset as wds

        self.out, self.split, self.mode, self.L = out, split, mode, seq_length
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tok = tok
        self.per_shard = samples_per_shard
        self.writer = wds.ShardWriter(
            str(out / f"{split}-%06d.tar"),
            maxcount=samples_per_shard,
            maxsize=1e15,
            verbose=0,
            mtime=0,
            encoder=False,
        )
        self.n_samples = 0
        self.n_docs = 0
        self.shard_tokens: list[int] = []
        self.doc_table: list[list[int]] = []  # segments mode: [first sample, n segments] per document
        self._buf = np.zeros(0, dtype=np.int64)  # packed mode: stream tokens not yet emitted
        self._starts: list[int] = []  # packed mode: document starts in _buf coordinates

    def _emit(self, tokens: np.ndarray, meta: dict[str, Any], n_real: int) -> None:
        shard = self.n_samples // self.per_shard
        if shard == len(self.shard_tokens):
            self.shard_tokens.append(0)
        self.shard_tokens[shard] += n_real
        self.writer.write(
            {
                "__key__": f"{self.n_samples:09d}",
                "tok": tokens.astype(self.dtype).tobytes(),
                "json": json.dumps(meta, separators=(",", ":")).encode(),
            }
        )
        self.n_samples += 1

    def add(self, ids: list[int]) -> None:
        """Add one document's ids (no specials)."""
        L = self.L
        self.n_docs += 1
        if self.mode == "packed":
            self._starts.append(len(self._buf))
            self._buf = np.concatenate([self._buf, np.asarray(ids, dtype=np.int64), [self.tok.eos_id]])
            while len(self._buf) >= L + 1:
                starts = [s for s in self._starts if s <= L]
                self._emit(self._buf[: L + 1], {"starts": starts}, L + 1)
                self._buf = self._buf[L:]
                self._starts = [s - L for s in self._starts if s - L >= 0]
        else:
            toks = np.asarray([self.tok.bos_id, *ids, self.tok.eos_id], dtype=np.int64)
            n_seg = (len(toks) - 2) // L + 1  # segments until every token but the first is a label
            self.doc_table.append([self.n_samples, n_seg])
            doc = len(self.doc_table) - 1
            for s in range(n_seg):
                chunk = toks[s * L : s * L + L + 1]
                n = len(chunk)
                if n < L + 1:
                    chunk = np.concatenate([chunk, np.full(L + 1 - n, self.tok.eos_id, dtype=np.int64)])
                self._emit(chunk, {"doc": doc, "seg": s, "n": n}, n)

    def close(self) -> dict[str, Any]:
        """Finish the tars (the packed tail shorter than one sample is dropped); describe the split."""
        self.writer.close()
        names = sorted(p.name for p in self.out.glob(f"{self.split}-*.tar"))
        n_shards = len(self.shard_tokens)
        for extra in names[n_shards:]:  # ShardWriter opens an empty tar even for zero samples
            (self.out / extra).unlink()
        shards = []
        for i in range(n_shards):
            path = self.out / f"{self.split}-{i:06d}.tar"
            count = min(self.per_shard, self.n_samples - i * self.per_shard)
            shards.append(
                {
                    "name": path.name,
                    "sha256": sha256_file(path),
                    "bytes": path.stat().st_size,
                    "samples": count,
                    "tokens": self.shard_tokens[i],
                }
            )
        info: dict[str, Any] = {
            "documents": self.n_docs,
            "samples": self.n_samples,
            "tokens": sum(self.shard_tokens),
            "shards": shards,
        }
        if self.mode == "segments":
            info["doc_table"] = self.doc_table
        return info


def build_shards(
    sources: list[Source],
    out_dir: str | Path,
    *,
    seq_length: int,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 32000,
    mode: str = "packed",
    valid_fraction: float = 0.01,
    split_seed: int = 0,
    samples_per_shard: int | None = None,
    text_key: str = "text",
    tokenizer_sample_bytes: int = 200_000_000,
    log: Any = print,
) -> Path:
    """Tokenize ``sources`` into train/valid shards under ``out_dir``; return the manifest path.

    With ``tokenizer=None`` a byte-level BPE of ``vocab_size`` is trained on (up to
    ``tokenizer_sample_bytes`` of) the training documents first. The directory is written under a
    temporary name and renamed at the end, so a crash never leaves a half-built manifest.
    """
    if mode not in MODES:
        raise DataError(f"packing mode {mode!r} is not one of {', '.join(MODES)}")
    if seq_length <= 0:
        raise DataError(f"seq_length={seq_length} must be > 0")
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out / MANIFEST} already exists; choose another --output or delete it")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # pass 1: document keys -> validation split (by document, stable hash)
    keys = [d.key for s in sources for d in s.iter_documents(text_key)]
    if not keys:
        raise DataError(f"the inputs {[s.path for s in sources]} contain no non-empty documents")
    if len(set(keys)) != len(keys):
        raise DataError("two inputs yield the same document keys; give each --input a distinct --name")
    valid = split_keys(keys, valid_fraction, split_seed)

    # pass 2: tokenizer
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
        shutil.copy(tok.path, tmp / TOKENIZER_FILE)
    elif tokenizer is not None:
        tok = Tokenizer(tokenizer)
        shutil.copy(tok.path, tmp / TOKENIZER_FILE)
    else:
        from megaret.data.tokenizer import train_tokenizer

        def sample() -> Iterator[str]:
            budget = tokenizer_sample_bytes
            for s in sources:
                for d in s.iter_documents(text_key):
                    if d.key not in valid and budget > 0:
                        budget -= len(d.text)
                        yield d.text

        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) ...")
        trained = train_tokenizer(sample(), vocab_size, tmp)
        tok = Tokenizer(tmp / TOKENIZER_FILE)
        assert tok.sha256 == trained.sha256
    if samples_per_shard is None:
        samples_per_shard = max(1, (1 << 25) // (seq_length + 1))  # ~32 M tokens per shard

    # pass 3: encode and pack
    writers = {
        sp: _SplitWriter(tmp, sp, mode, seq_length, tok.dtype, tok, samples_per_shard) for sp in SPLITS
    }
    src_info = []
    for s in sources:
        n_docs = {sp: 0 for sp in SPLITS}
        n_bytes = 0
        batch: list[Document] = []

        def flush(batch: list[Document]) -> None:
            for d, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
                writers["valid" if d.key in valid else "train"].add(ids)

        for d in s.iter_documents(text_key):
            n_docs["valid" if d.key in valid else "train"] += 1
            n_bytes += len(d.text.encode("utf-8", errors="replace"))
            batch.append(d)
            if len(batch) >= 256:
                flush(batch)
                batch = []
        flush(batch)
        src_info.append(
            {
                "name": s.name,
                "path": s.path,
                "license": s.license,
                "bytes": n_bytes,
                "documents": n_docs["train"] + n_docs["valid"],
                "valid_documents": n_docs["valid"],
            }
        )
    splits = {sp: w.close() for sp, w in writers.items()}
    if splits["train"]["samples"] == 0:
        raise DataError(
            f"the inputs hold fewer than seq_length+1={seq_length + 1} training tokens; "
            "add text or lower seq_length"
        )
    manifest = {
        "format": FORMAT, "version": VERSION, "mode": mode, "seq_length": seq_length,
        "sample_tokens": seq_length + 1, "dtype": tok.dtype,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "valid_fraction": valid_fraction, "split_seed": split_seed, "sources": src_info, "splits": splits,
    }  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    os.replace(tmp, out)
    return out / MANIFEST


# ---------------------------------------------------------------------------------------------
# reading


def _is_remote(loc: str) -> bool:
    return "://" in loc or loc.startswith("pipe:")


def _join(base: str, name: str) -> str:
    """Shard location next to the manifest (works for paths, URLs and trailing-path pipe: commands)."""
    if _is_remote(name) or name.startswith("/"):
        return name
    return base.rsplit("/", 1)[0] + "/" + name if "/" in base else name


def load_manifest(location: str | Path) -> tuple[dict[str, Any], str]:
    """(manifest dict, its location) for a shard directory, a manifest.json path, a URL or a pipe: command."""
    loc = str(location)
    if not _is_remote(loc):
        p = Path(loc)
        if p.is_dir():
            p = p / MANIFEST
        if not p.is_file():
            raise DataError(
                f"manifest {p} does not exist; build shards with data_tools/build_shards.py or fix data.paths"
            )
        loc = str(p.resolve())
        raw = p.read_bytes()
    else:
        import webdataset as wds

        try:
            with wds.gopen(loc, "rb") as fh:
                raw = fh.read()
        except Exception as exc:  # noqa: BLE001 - any transport failure is reported the same way
            raise DataError(f"cannot read manifest {loc}: {exc}") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"manifest {loc} is not valid JSON ({exc}); rebuild the shards") from exc
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"manifest {loc} is not a {FORMAT} manifest; build it with data_tools/build_shards.py"
        )
    return manifest, loc


@dataclass
class ShardInfo:
    name: str
    location: str  # where the manifest says it is
    local: str | None  # verified local file (None: skipped as corrupt)
    samples: int
    sha256: str


@dataclass
class ShardSet:
    """The verified shards of one split of one manifest, with indexed sample access."""

    manifest: dict[str, Any]
    location: str
    split: str
    shards: list[ShardInfo]
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self._orig_cum = np.concatenate([[0], np.cumsum(counts)])  # over all shards (doc_table coordinates)
        self.usable = [i for i, s in enumerate(self.shards) if s.local is not None]
        ucounts = counts[self.usable] if self.usable else np.zeros(0, dtype=np.int64)
        self._usable_cum = np.concatenate([[0], np.cumsum(ucounts)])
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.sample_tokens = int(self.manifest["sample_tokens"])
        self._open: OrderedDict[int, Any] = OrderedDict()

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def num_samples(self) -> int:
        """Samples in the usable (verified) shards."""
        return int(self._usable_cum[-1])

    def doc_table(self) -> list[tuple[int, int]]:
        """(first sample in all-shard coordinates, segments) of each document whose shards are all usable."""
        table = self.manifest["splits"][self.split].get("doc_table")
        if table is None:
            raise DataError(
                f"manifest {self.location} was built in {self.mode!r} mode; stateful loading needs "
                "shards built with --mode segments"
            )
        ok = np.zeros(len(self.shards), dtype=bool)
        ok[self.usable] = True
        out = []
        for first, n in table:
            s0 = int(np.searchsorted(self._orig_cum, first, side="right") - 1)
            s1 = int(np.searchsorted(self._orig_cum, first + n - 1, side="right") - 1)
            if ok[s0 : s1 + 1].all():
                out.append((int(first), int(n)))
        return out

    def _tar(self, shard: int) -> Any:
        tar = self._open.get(shard)
        if tar is None:
            path = self.shards[shard].local
            try:
                tar = _FastIndexedTar(path, verbose=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"shard {path} cannot be opened as a tar ({exc}); rebuild it") from exc
            self._open[shard] = tar
            if len(self._open) > 64:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return tar

    def _read(self, shard: int, local: int) -> tuple[np.ndarray, dict[str, Any]]:
        tar = self._tar(shard)
        key = f"{int(self._orig_cum[shard]) + local:09d}"  # keys number samples across the split's shards
        try:
            _, tok = tar.get_by_name(key + ".tok")
            _, meta = tar.get_by_name(key + ".json")
        except KeyError as exc:
            raise DataError(
                f"shard {self.shards[shard].local} lacks sample {key} ({exc}); rebuild it"
            ) from exc
        tokens = np.frombuffer(tok, dtype=self.dtype)  # (sample_tokens,)
        if tokens.shape[0] != self.sample_tokens:
            raise DataError(
                f"shard {self.shards[shard].local} sample {key} has {tokens.shape[0]} tokens, "
                f"the manifest says {self.sample_tokens}; rebuild it"
            )
        return tokens, json.loads(bytes(meta))

    def read_usable(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample ``index`` of the usable-sample space [0, num_samples)."""
        u = int(np.searchsorted(self._usable_cum, index, side="right") - 1)
        return self._read(self.usable[u], index - int(self._usable_cum[u]))

    def read_global(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample ``index`` in all-shard coordinates (the doc_table's)."""
        s = int(np.searchsorted(self._orig_cum, index, side="right") - 1)
        return self._read(s, index - int(self._orig_cum[s]))

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:  # open mmaps do not travel to loader workers
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def _fast_index(mm: Any) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """Member offsets of an uncompressed tar: ~3x faster than wids' header-by-header namedtuples."""
    by_name, by_index = {}, []
    off, end = 0, len(mm)
    while off + 512 <= end:
        name = mm[off : off + 100].split(b"\0", 1)[0].decode()
        if not name:
            break
        size = int(mm[off + 124 : off + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        if mm[off + 156 : off + 157] in (b"0", b"\0"):
            by_name[name] = off
            by_index.append((name, off, size))
        off += 512 + (size + 511) // 512 * 512
    return by_name, by_index


def _fast_indexed_tar_class() -> type:
    from wids.wids_mmtar import MMIndexedTar

    class FastIndexedTar(MMIndexedTar):
        """wids' mmap-indexed tar reader with a faster index build."""

        def _build_index(self) -> None:
            self.by_name, self.by_index = _fast_index(self.mmapped_file)

    return FastIndexedTar


def _FastIndexedTar(path: str | None, verbose: bool = False) -> Any:  # noqa: N802 - a class factory
    global _FAST_CLS
    if _FAST_CLS is None:
        _FAST_CLS = _fast_indexed_tar_class()
    return _FAST_CLS(path, verbose=verbose)


_FAST_CLS: type | None = None


def _fetch(loc: str, sha: str, cache_dir: Path) -> Path:
    """Copy a remote shard (URL or pipe:) into the cache, named by its expected hash."""
    import webdataset as wds

    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{sha}.tar"
    if dest.exists():
        return dest
    tmp = cache_dir / f"{sha}.tar.tmp-{os.getpid()}"
    try:
        with wds.gopen(loc, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except Exception as exc:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot fetch shard {loc}: {exc}") from exc
    os.replace(tmp, dest)
    return dest


def _stamp_path(stamp_dir: Path, local: Path) -> Path:
    return stamp_dir / f"{hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:32]}.json"


def _file_identity(local: Path) -> dict[str, int]:
    st = local.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}


def verified_digest(local: Path, expected: str, stamp_dir: Path | None = None) -> str:
    """The sha256 of a local shard, trusting a stamp left by an earlier verification.

    With ``stamp_dir``, a shard that once hashed to ``expected`` gets a stamp recording its
    size, mtime, inode and device; while all four are unchanged the stamp stands in for the
    hash, so restarts (and the other ranks of a node, once one has verified) do not read every
    shard again. Any write to the file changes its mtime, so a shard corrupted later is hashed
    (and caught) again.
    """
    if stamp_dir is not None:
        stamp = _stamp_path(stamp_dir, local)
        try:
            record = json.loads(stamp.read_text())
        except (OSError, ValueError):
            record = None
        if record == {"sha256": expected, **_file_identity(local)}:
            return expected
    digest = sha256_file(local)
    if stamp_dir is not None and digest == expected:
        try:
            stamp_dir.mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"sha256": digest, **_file_identity(local)}))
            os.replace(tmp, stamp)
        except OSError as exc:  # a read-only cache only costs the next open a re-hash
            warnings.warn(f"cannot write the verification stamp {stamp}: {exc}", stacklevel=2)
    return digest


def open_split(
    location: str | Path,
    split: str = "train",
    *,
    tokenizer: str | Path | Tokenizer | None = None,
    on_corrupt: str = "error",
    cache_dir: str | Path | None = None,
    stamp_dir: str | Path | None = None,
) -> ShardSet:
    """Load a manifest, check its tokenizer, and verify every shard of ``split`` against its sha256.

    Missing shards and a tokenizer whose hash differs from the manifest's are always errors; a
    corrupt or truncated shard is an error, or with ``on_corrupt="skip"`` is left out with a
    warning (and listed in :attr:`ShardSet.skipped`). Remote shards are fetched to ``cache_dir``.
    ``stamp_dir``: where verifications are remembered (see :func:`verified_digest`); None
    hashes every shard.
    """
    if on_corrupt not in ("error", "skip"):
        raise DataError(f"on_corrupt={on_corrupt!r} is not one of error, skip")
    manifest, loc = load_manifest(location)
    if split not in manifest["splits"]:
        raise DataError(f"manifest {loc} has no split {split!r} (has {', '.join(manifest['splits'])})")
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        if tok.sha256 != manifest["tokenizer"]["sha256"]:
            raise DataError(
                f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) does not match the one the shards of "
                f"{loc} were built with (sha256 {manifest['tokenizer']['sha256'][:12]}); "
                "use that tokenizer.json or rebuild"
            )
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "megaret" / "shards"
    shards, skipped = [], []
    for entry in manifest["splits"][split]["shards"]:
        where = _join(loc, entry["name"])
        if _is_remote(where):
            local = _fetch(where, entry["sha256"], cache)
        else:
            local = Path(where)
            if not local.is_file():
                raise DataError(f"shard {local} listed in {loc} is missing; restore it or rebuild the shards")
        size, digest = local.stat().st_size, None
        if size == entry["bytes"]:
            digest = verified_digest(local, entry["sha256"], Path(stamp_dir) if stamp_dir else None)
        if digest != entry["sha256"]:
            why = (
                f"is truncated or padded ({size} bytes, manifest says {entry['bytes']})"
                if digest is None
                else f"is corrupt (sha256 {digest[:12]} != manifest {entry['sha256'][:12]})"
            )
            if on_corrupt == "error":
                raise DataError(f"shard {where} {why}; restore it, rebuild, or set data.on_corrupt=skip")
            warnings.warn(f"skipping shard {where}: it {why} (data.on_corrupt=skip)", stacklevel=2)
            skipped.append(where)
            if _is_remote(where):
                local.unlink(missing_ok=True)
            shards.append(ShardInfo(entry["name"], where, None, entry["samples"], entry["sha256"]))
            continue
        shards.append(ShardInfo(entry["name"], where, str(local), entry["samples"], entry["sha256"]))
    return ShardSet(manifest, loc, split, shards, skipped)


def iter_manifest_tokens(sets: Iterable[ShardSet]) -> Iterator[np.ndarray]:
    """Every usable sample's tokens, in order (for tools and checks, not training)."""
    for s in sets:
        for i in range(s.num_samples):
            yield s.read_usable(i)[0]
