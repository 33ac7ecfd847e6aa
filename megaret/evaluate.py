"""Perplexity over long documents, streamed window by window with carried state.

    python -m megaret.evaluate --config configs/tiny.yaml [--weights model.pt] \\
        [--data DIR_OR_MANIFEST] [--context 16384] [--chunk 2048] [--max-docs 50] [key=value ...]
    python -m megaret.evaluate --checkpoint runs/tiny [...]   # config from the checkpoint

--checkpoint (a step, checkpoints/ or run directory) is consolidated in memory as by
`megaret.export`; its manifest supplies the config, so --config is optional.

Documents of the split (default valid) are reassembled from the shards (--data, default the
configured data.paths or the embedded default corpus), truncated to --context tokens and
streamed --chunk tokens (the evaluation window) at a time; memory stays flat in the document
length (except the causal Transformer's KV cache). Prints a loss table by position bucket, then one JSON line
(stdout); the documents scored so far show as a progress bar on stderr (a terminal; one final line
in logs and CI: megaret/progress.py). Third-party log chatter (DeepSpeed's) stays off the console.
--context and --chunk must be positive; a run that scores no token (e.g. no document of the
split longer than --min-doc-tokens) exits 1 with one line saying why.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

from megaret.data import open_split, resolve_manifests
from megaret.data.from_config import check_vocab
from megaret.entry import run_entry
from megaret.infer.loading import InferenceError, add_model_args, load_model
from megaret.infer.perplexity import check_window, evaluate_documents, iter_documents
from megaret.parallel.context import destroy_parallel_context
from megaret.progress import Progress
from megaret.train.chatter import quiet_third_party


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data", help="shard directory or manifest (default: the configured data)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--context", type=int, default=16384, help="tokens scored per document at most")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per call (default data.seq_length)")
    parser.add_argument("--max-docs", type=int, default=None)
    parser.add_argument("--min-doc-tokens", type=int, default=2,
                        help="skip documents of at most this many tokens (--context: full-length only)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides before and after flags
    with quiet_third_party():
        return run_entry(lambda: _evaluate(args), destroy_parallel_context)


def _evaluate(args: argparse.Namespace) -> dict:
    check_window(args.context, args.chunk)  # before loading
    if args.max_docs is not None and args.max_docs < 1:
        raise InferenceError(f"--max-docs {args.max_docs} is outside [1, inf): "
                             "leave it out to score every document")
    cfg, model, ctx, _ = load_model(args.config, args.weights, args.checkpoint, args.overrides)
    data = args.data or resolve_manifests(cfg)[0]
    shards = open_split(data, args.split, tokenizer=cfg.data.tokenizer)
    check_vocab(shards, cfg.model.vocab_size)  # ids the model has no row for: refused, not masked
    shortest = max(args.min_doc_tokens, 1)  # a document of n tokens scores n - 1
    seen = 0
    in_split = shards.manifest["splits"].get(args.split, {}).get("documents")
    total = min(n for n in (in_split, args.max_docs) if n is not None) if in_split or args.max_docs else None
    progress = Progress(f"evaluating {args.split}", total=total, unit="doc")

    def long_enough():
        nonlocal seen
        for doc in iter_documents(shards):
            seen += 1
            if len(doc) > shortest:
                yield doc

    def counted(docs):
        for doc in docs:
            yield doc
            progress.update()  # scored: the next one is asked for

    docs = counted(itertools.islice(long_enough(), args.max_docs))  # --max-docs counts scored documents
    window = cfg.data.seq_length if args.chunk is None else args.chunk  # the evaluation window
    with progress:
        result = evaluate_documents(model, docs, args.context, window, device=ctx.device)
        # nothing scored: the error below is the one line (no progress summary before it)
        scored = f"{result.documents:,} documents, {result.tokens:,} tokens scored"
        progress.close(scored if result.tokens else "")
    if not result.tokens:
        where = f"split {args.split!r} of {data}"
        why = (f"{where} holds no documents" if not seen else
               f"none of the {seen} documents of {where} has more than {shortest} tokens "
               f"(--min-doc-tokens {args.min_doc_tokens}): lower --min-doc-tokens or pick another --split")
        raise InferenceError(f"no tokens scored: {why}")
    summary = result.summary()
    summary.update(arch=cfg.model.arch, context=args.context, chunk=window, split=args.split)
    print(f"{'positions':>16} {'tokens':>10} {'loss':>8} {'ppl':>10}")
    for b in summary["buckets"]:
        if b["tokens"]:
            span = f"{b['from']:>7}-{b['to']:<8}"
            print(f"{span} {b['tokens']:>10} {b['loss']:8.4f} {math.exp(b['loss']):10.2f}")
    print(f"{'all':>16} {result.tokens:>10} {result.loss:8.4f} {result.perplexity:10.2f}  "
          f"({result.documents} documents, {summary['tokens_per_s']:.0f} tokens/s, "
          f"carried state {result.state_bytes / 2**20:.2f} MiB)")
    print(json.dumps(summary))
    return summary

if __name__ == "__main__":
    main()
