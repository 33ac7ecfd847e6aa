"""Writing token shards: documents -> tokenizer -> packed samples in WebDataset tars + manifest.

The format is described in :mod:`megaret.data.shards.layout`; :func:`build_shards` is the one entry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megaret.data.corpus import ON_BINARY, Document, Skipped, Source, split_keys
from megaret.data.errors import DataError
from megaret.data.shards.layout import FORMAT, MANIFEST, MODES, SPLITS, VERSION, sha256_file
from megaret.data.tokenizer import TOKENIZER_FILE, Tokenizer


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
        self.shard_max: list[int] = []  # largest token id per shard (vs model.vocab_size)
        self.doc_table: list[list[int]] = []  # segments mode: [first sample, n segments] per document
        self._buf = np.zeros(0, dtype=np.int64)  # packed mode: stream tokens not yet emitted
        self._starts: list[int] = []  # packed mode: document starts in _buf coordinates

    def _emit(self, tokens: np.ndarray, meta: dict[str, Any], n_real: int) -> None:
        shard = self.n_samples // self.per_shard
        if shard == len(self.shard_tokens):
            self.shard_tokens.append(0)
            self.shard_max.append(0)
        self.shard_tokens[shard] += n_real
        self.shard_max[shard] = max(self.shard_max[shard], int(tokens.max()))
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
                segment = toks[s * L : s * L + L + 1]
                n = len(segment)
                if n < L + 1:
                    segment = np.concatenate([segment, np.full(L + 1 - n, self.tok.eos_id, dtype=np.int64)])
                self._emit(segment, {"doc": doc, "seg": s, "n": n}, n)

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
                    "max_id": self.shard_max[i],
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
    on_binary: str = "error",
    tokenizer_sample_bytes: int = 200_000_000,
    eos_token: str | None = None,
    bos_token: str | None = None,
    progress: bool = False,
    log: Any = print,
) -> Path:
    """Tokenize ``sources`` into train/valid shards under ``out_dir``; return the manifest path.

    With ``tokenizer=None`` a byte-level BPE of ``vocab_size`` is trained on (up to
    ``tokenizer_sample_bytes`` of) the training documents first. ``valid_fraction`` must be in
    (0, 1); a split left empty anyway (too few documents or tokens) is logged as a warning
    (:func:`split_warnings`). ``on_binary``: refuse a binary input file ("error") or skip it
    ("skip"); skipped files are counted per source in the manifest. ``eos_token``/``bos_token`` name
    a given tokenizer's end/begin-of-document tokens (default: found by common names, see
    :class:`Tokenizer`). ``progress``: a tqdm bar (documents/s, tokens/s) while encoding, on
    stderr. The directory is written
    under a temporary name and renamed at the end, so a crash never leaves a half-built
    manifest; a build that fails removes its temporary directory.
    """
    if mode not in MODES:
        raise DataError(f"packing mode {mode!r} is not one of {', '.join(MODES)}")
    if seq_length <= 0:
        raise DataError(f"seq_length={seq_length} must be > 0")
    if not 0 < valid_fraction < 1:
        raise DataError(
            f"--valid-fraction {valid_fraction} is outside (0, 1): give the share of documents held out "
            "for evaluation, e.g. 0.01"
        )
    if on_binary not in ON_BINARY:
        raise DataError(f"on_binary={on_binary!r} is not one of {', '.join(ON_BINARY)}")
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out / MANIFEST} already exists; choose another --output or delete it")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _build_into(
            tmp, sources, seq_length=seq_length, tokenizer=tokenizer, vocab_size=vocab_size, mode=mode,
            valid_fraction=valid_fraction, split_seed=split_seed, samples_per_shard=samples_per_shard,
            text_key=text_key, on_binary=on_binary, tokenizer_sample_bytes=tokenizer_sample_bytes, log=log,
            specials={"eos_token": eos_token, "bos_token": bos_token}, progress=progress,
        )  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:  # also Ctrl-C: no half-built folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for warning in split_warnings(manifest):
        log(f"warning: {warning}")
    return out / MANIFEST


class _Progress:
    """Documents and tokens encoded so far, shown as a tqdm bar with documents/s and tokens/s."""

    def __init__(self, total: int, show: bool) -> None:
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", desc="encoding", mininterval=1.0, smoothing=0.1)
        self.tokens = 0

    def add(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None and docs:
            self.bar.update(docs)
            rate = self.tokens / max(self.bar.format_dict["elapsed"], 1e-9)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def split_warnings(manifest: dict[str, Any]) -> list[str]:
    """A line for each split without samples (training with evaluation refuses such a dataset)."""
    out = []
    for split, info in manifest["splits"].items():
        if info["samples"] == 0:
            n = info["documents"]
            why = (f"its {n} documents hold fewer than one sample of {manifest['sample_tokens']} tokens" if n
                   else "no document went to it")  # fmt: skip
            out.append(
                f"the {split} split is empty ({why}): training with evaluation will refuse these shards; "
                "add documents or raise --valid-fraction"
            )
    return out


def _build_into(
    tmp: Path,
    sources: list[Source],
    *,
    seq_length: int,
    tokenizer: str | Path | Tokenizer | None,
    vocab_size: int,
    mode: str,
    valid_fraction: float,
    split_seed: int,
    samples_per_shard: int | None,
    text_key: str,
    on_binary: str,
    tokenizer_sample_bytes: int,
    log: Any,
    specials: dict[str, str | None],
    progress: bool,
) -> dict[str, Any]:
    """Write the tokenizer and both splits' shards into ``tmp``; return the manifest."""
    # pass 1: document keys -> validation split (by document, stable hash); skipped files counted
    keys: list[str] = []
    skipped = {s.name: Skipped() for s in sources}
    for s in sources:
        keys += [d.key for d in s.iter_documents(text_key, on_binary, skipped[s.name])]
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
        tok = Tokenizer(tokenizer, **specials)
        shutil.copy(tok.path, tmp / TOKENIZER_FILE)
        log(f"tokenizer {tok.path}: {tok.vocab_size} ids, end {tok.eos_token!r} (id {tok.eos_id}), begin "
            f"{tok.bos_token!r} (id {tok.bos_id}), encoded with {tok.encoder}")
    else:
        from megaret.data.tokenizer import train_tokenizer

        def sample() -> Iterator[str]:
            budget = tokenizer_sample_bytes
            for s in sources:
                for d in s.iter_documents(text_key, on_binary):
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
    bar = _Progress(len(keys), progress)
    for s in sources:
        n_docs = {sp: 0 for sp in SPLITS}
        n_bytes = 0
        batch: list[Document] = []

        def flush(batch: list[Document]) -> None:
            n_tokens = 0
            for d, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
                writers["valid" if d.key in valid else "train"].add(ids)
                n_tokens += len(ids)
            bar.add(len(batch), n_tokens)

        for d in s.iter_documents(text_key, on_binary):
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
                "skipped_files": skipped[s.name].summary(),
            }
        )
    bar.close()
    splits = {sp: w.close() for sp, w in writers.items()}
    if splits["train"]["samples"] == 0:
        raise DataError(
            f"the inputs hold fewer than seq_length+1={seq_length + 1} training tokens; "
            "add text or lower seq_length"
        )
    return {
        "format": FORMAT, "version": VERSION, "mode": mode, "seq_length": seq_length,
        "sample_tokens": seq_length + 1, "dtype": tok.dtype,
        "tokenizer": tok.describe(),
        "valid_fraction": valid_fraction, "split_seed": split_seed, "sources": src_info, "splits": splits,
    }  # fmt: skip
