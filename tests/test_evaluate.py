"""Streamed evaluation: chunk-by-chunk loss with carried state equals the one-pass loss,
position buckets partition the tokens, RetNet's carried state does not grow with length,
and documents are reassembled identically from packed and segment shards."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from megaret.config import load_config
from megaret.data import open_split
from megaret.infer.perplexity import (
    EvalResult,
    bucket_edges,
    evaluate_documents,
    evaluate_sequence,
    iter_documents,
)
from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config
from tests.conftest import REPO
from tests.data_fixtures import build_tiny


def build(ctx1, name: str, dtype: torch.dtype = torch.float64):
    cfg = load_config(f"configs/{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel, params_dtype=dtype), ctx1.tp)
    return cfg, model.to(dtype).eval()


@pytest.mark.parametrize("name,chunk", [("tiny", 24), ("transformer-tiny", 24), ("sliding-tiny", 24),
                                        ("brt-tiny", 32)])
def test_streamed_loss_equals_one_pass(ctx1, name, chunk):
    cfg, model = build(ctx1, name)
    n = 100  # not a multiple of the chunk: the last chunk is partial (padded for BRT)
    ids = torch.randint(cfg.model.vocab_size, (2, n + 1), generator=torch.Generator().manual_seed(3))
    streamed = evaluate_sequence(model, ids, chunk, context=128)
    with torch.no_grad():
        if name == "brt-tiny":  # one block-aligned call over the padded sequence
            pad = -n % cfg.model.block_size
            x = torch.cat([ids[:, :-1], ids.new_zeros(2, pad)], 1)
            y = torch.cat([ids[:, 1:], ids.new_zeros(2, pad)], 1)
            ref = model(x, y).loss[:, :n]
        else:
            kw = {"retention_mode": "parallel"} if name == "tiny" else {}
            ref = model(ids[:, :-1], ids[:, 1:], **kw).loss  # (B, n)
    ref = ref.double()  # megatron's cross-entropy returns fp32 losses: compare at fp32 precision
    assert streamed.tokens == 2 * n
    assert abs(streamed.loss - ref.mean().item()) < 1e-6
    assert abs(streamed.perplexity - math.exp(ref.mean().item())) < 1e-6 * streamed.perplexity
    edges = bucket_edges(128)
    assert edges == [0, 64, 128]
    assert streamed.bucket_tokens == [2 * 64, 2 * 36]
    assert abs(streamed.bucket_nll[0] - ref[:, :64].sum().item()) < 1e-4
    assert abs(streamed.bucket_nll[1] - ref[:, 64:].sum().item()) < 1e-4


def test_retnet_state_is_flat_in_length_and_transformer_cache_grows(ctx1):
    cfg, retnet = build(ctx1, "tiny", torch.float32)
    _, transformer = build(ctx1, "transformer-tiny", torch.float32)
    sizes = {}
    for n in (64, 256):
        ids = torch.randint(cfg.model.vocab_size, (1, n + 1))
        sizes[n] = tuple(evaluate_sequence(m, ids, 32).state_bytes for m in (retnet, transformer))
    assert sizes[64][0] == sizes[256][0] > 0
    assert sizes[256][1] == 4 * sizes[64][1]


def test_bucket_edges_and_documents(ctx1):
    assert bucket_edges(16384)[:4] == [0, 64, 128, 256] and bucket_edges(16384)[-2:] == [8192, 16384]
    cfg, model = build(ctx1, "tiny")
    docs = [np.arange(50) % 7, np.arange(3), np.arange(200) % 11, np.arange(1)]
    res = evaluate_documents(model, docs, context=128, window=32)
    assert res.documents == 3  # the one-token document has nothing to score
    assert res.tokens == 49 + 2 + 128  # the long one is cut at the context
    one = EvalResult(bucket_edges(128))
    for d in docs[:3]:
        evaluate_sequence(model, torch.from_numpy(np.asarray(d[:129], dtype=np.int64))[None], 32, one)
    assert abs(one.nll - res.nll) < 1e-6 and one.bucket_tokens == res.bucket_tokens


def test_documents_reassemble_from_packed_and_segment_shards(tmp_path):
    packed = build_tiny(tmp_path, mode="packed", seq_length=16, name="p")
    tok = str(packed.parent / "tokenizer.json")
    segments = build_tiny(tmp_path, mode="segments", seq_length=16, tokenizer=tok, name="s")
    bos, eos = 0, 1
    p_set = open_split(packed, "train")
    p_docs = list(iter_documents(p_set))
    s_docs = list(iter_documents(open_split(segments, "train")))
    # packed: one <eos> per document, at its end (the last may be cut with the dropped tail) ...
    assert len(p_docs) == json.loads(packed.read_text())["splits"]["train"]["documents"] > 10
    assert all(d[-1] == eos and (d == eos).sum() == 1 for d in p_docs[:-1])
    # ... and together they are the stream the overlapping samples cover, token for token
    samples = [p_set.read_usable(i)[0].astype(np.int64) for i in range(p_set.num_samples)]
    stream = np.concatenate([x[:-1] for x in samples] + [samples[-1][-1:]])
    assert np.concatenate(p_docs).tolist() == stream.tolist()
    # segments: <bos> doc <eos> each, as many as the manifest lists
    assert len(s_docs) == json.loads(segments.read_text())["splits"]["train"]["documents"]
    assert all(d[0] == bos and d[-1] == eos and (d == eos).sum() == 1 for d in s_docs)
    # the two modes split train/valid on their own, but a document both hold reads the same
    s_bodies = {tuple(d[1:].tolist()) for d in s_docs}
    shared = [d for d in p_docs[:-1] if tuple(d.tolist()) in s_bodies]
    assert len(shared) > len(p_docs) // 2
    assert any(len(d) > 3 * 16 for d in shared)  # including documents spanning several segments/samples


def test_evaluate_cli(tmp_path, ctx1):
    shards = build_tiny(tmp_path, mode="packed", seq_length=64, name="v", valid_fraction=0.3)
    cfg, model = build(ctx1, "tiny", torch.float32)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.evaluate", "--config", "configs/tiny.yaml", "--weights",
         str(tmp_path / "w.pt"), "--data", str(shards), "--context", "256", "--chunk", "48",
         "--max-docs", "5"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    docs = list(iter_documents(open_split(shards, "valid")))[:5]
    want = evaluate_documents(model, docs, context=256, window=256)  # one pass per document
    assert summary["tokens"] == want.tokens and summary["documents"] == want.documents
    assert abs(summary["loss"] - want.loss) < 1e-5
