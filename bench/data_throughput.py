"""Data pipeline throughput against what the tiny model consumes.

    python bench/data_throughput.py [--quick] [--config configs/tiny.yaml] [--workers 2] [--cache-dir DIR]

Measures (on the embedded default corpus, small mode unless --full):
  * tokenizer encode tokens/s (tiktoken with the trained merges, 2 threads),
  * loader tokens/s with --workers DataLoader workers (steady state, first batch excluded),
  * training consumption tokens/s of one optimizer step of the config's model (as in megaret.train),
and the headroom = loader / consumption (goal >= 20). Prints a JSON object, then a last line of
name=value pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_tokens_per_s(cfg, steps: int) -> float:  # noqa: ANN001
    """Tokens/s of forward+backward+AdamW steps of the configured model on one process."""
    import torch

    from megaret.models.retnet import RetNet
    from megaret.parallel.context import build_parallel_context, destroy_parallel_context
    from megaret.parallel.megatron_config import megatron_config

    ctx = build_parallel_context(1, 1, seed=cfg.train.seed)
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, L = cfg.train.micro_batch_size, cfg.data.seq_length
    x = torch.randint(cfg.model.vocab_size, (B, L))  # (B, L)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(x, x).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    destroy_parallel_context()
    step = sorted(times[2:])[len(times[2:]) // 2]  # median after warm-up
    return B * L / step


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batches and steps")
    ap.add_argument("--full", action="store_true", help="the full default corpus (slower first build)")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "megaret" / "data"))
    args = ap.parse_args(argv)

    from megaret.config import load_config
    from megaret.data import ensure_default_shards, load_manifest, open_split
    from megaret.data.default_corpus import stdlib_documents
    from megaret.data.loader import TokenLoader
    from megaret.data.tokenizer import Tokenizer
    from megaret.data.vocab import default_corpus_vocab, resolve_vocab

    cfg = load_config(args.config, [])
    t0 = time.time()
    manifest = ensure_default_shards(
        args.cache_dir, default_corpus_vocab(cfg), cfg.data.seq_length, small=not args.full
    )
    build_s = time.time() - t0
    m, _ = load_manifest(manifest)
    resolve_vocab(cfg, m["tokenizer"]["vocab_size"], read_data=False)
    tok = Tokenizer(manifest.parent)
    hf = Tokenizer(manifest.parent, encoder="tokenizers")  # the same ids without the tiktoken path

    texts = [d.text for d in stdlib_documents(small=True)]
    tok.encode_batch(texts[:5])
    t0 = time.perf_counter()
    n_tok = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=2))
    encode_tps = n_tok / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    hf_ids = hf.encode_batch(texts)
    hf_encode_tps = sum(len(ids) for ids in hf_ids) / (time.perf_counter() - t0)
    assert tok.encoder == "tiktoken" and hf_ids == tok.encode_batch(texts), "tiktoken ids differ from HF's"

    n_batches = 1000 if args.quick else 5000
    loader = TokenLoader(
        [open_split(manifest, "train")], micro_batch_size=cfg.train.micro_batch_size, dp_rank=0, dp_size=1,
        seed=cfg.train.seed, num_workers=args.workers,
    )  # fmt: skip
    it = iter(loader)
    next(it)  # worker start-up and shard indexing are not throughput
    t0 = time.perf_counter()
    n = sum(b["tokens"].numel() for b in itertools.islice(it, n_batches))
    loader_tps = n / (time.perf_counter() - t0)

    train_tps = train_tokens_per_s(cfg, 5 if args.quick else 20)
    result = {
        "corpus_train_documents": m["splits"]["train"]["documents"],
        "corpus_valid_documents": m["splits"]["valid"]["documents"],
        "corpus_bytes": sum(s["bytes"] for s in m["sources"]),
        "corpus_train_tokens": m["splits"]["train"]["tokens"],
        "shard_build_or_reuse_s": round(build_s, 2),
        "tokenizer_encode_tokens_per_s": round(encode_tps),
        "tokenizer_encode_tokens_per_s_hf_tokenizers": round(hf_encode_tps),
        "loader_tokens_per_s": round(loader_tps),
        "loader_workers": args.workers,
        "micro_batch_size": cfg.train.micro_batch_size,
        "seq_length": cfg.data.seq_length,
        "train_tokens_per_s": round(train_tps),
        "headroom": round(loader_tps / train_tps, 1),
    }
    print(json.dumps(result, indent=1))
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
