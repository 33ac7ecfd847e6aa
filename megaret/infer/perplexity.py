"""Long-context evaluation streamed window by window with carried state.

A document of N tokens is fed in evaluation windows of `window` tokens (the CLI's --chunk);
each call continues from the state the previous one returned, so the activations held at
any time are one window's and
the carried memory is the model's state: constant for RetNet (per-layer Dk x Dv matrices),
the window (+ S state vectors) for sliding/BRT, and a growing KV cache only for the causal
Transformer. The result is exactly the one-pass loss (tests/test_evaluate.py) at any length.

Besides the mean negative log-likelihood and perplexity, losses are summed by position
bucket (edges 0, 64, 128, ... doubling up to the context), which shows whether a model
keeps using context far back: a long-context model's loss keeps falling with position.

BRT takes only block-aligned calls (its spec's `call_multiple`): the window is a multiple of
model.block_size and the last window is padded (padding comes after every scored token, so
causality hides it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from megaret.data.shards import ShardSet
from megaret.infer.loading import InferenceError
from megaret.models.spec import arch_spec


def check_window(context: int | None, window: int | None) -> None:
    """Raises InferenceError unless the context (tokens scored per document at most) and the
    evaluation window (the CLI's --chunk) are positive where given."""
    if context is not None and context <= 0:
        raise InferenceError(f"--context {context} is outside [1, inf): the tokens scored per document "
                             "at most")
    if window is not None and window <= 0:
        raise InferenceError(f"--chunk {window} is outside [1, inf): the tokens per call "
                             "(leave it out for data.seq_length)")


def bucket_edges(context: int, first: int = 64) -> list[int]:
    """[0, first, 2 first, 4 first, ..., context]: the left edges plus the final right edge."""
    edges, e = [0], first
    while e < context:
        edges.append(e)
        e *= 2
    return [*edges, context]


@dataclass
class EvalResult:
    """Summed negative log-likelihood (nats) and token counts, overall and per position bucket."""

    edges: list[int]
    nll: float = 0.0
    tokens: int = 0
    documents: int = 0
    bucket_nll: list[float] = field(default_factory=list)
    bucket_tokens: list[int] = field(default_factory=list)
    state_bytes: int = 0  # bytes of the state carried after the longest document
    seconds: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.edges) - 1
        self.bucket_nll = self.bucket_nll or [0.0] * n
        self.bucket_tokens = self.bucket_tokens or [0] * n

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def add(self, losses: torch.Tensor, start: int) -> None:
        """losses: (B, n) per-token nll of positions start .. start + n - 1 (all real tokens)."""
        per_pos = losses.double().sum(0)  # (n,)
        b = losses.shape[0]
        self.nll += float(per_pos.sum())
        self.tokens += losses.numel()
        for i in range(len(self.edges) - 1):
            lo, hi = max(self.edges[i], start), min(self.edges[i + 1], start + losses.shape[1])
            if lo < hi:
                self.bucket_nll[i] += float(per_pos[lo - start : hi - start].sum())
                self.bucket_tokens[i] += b * (hi - lo)

    def summary(self) -> dict[str, Any]:
        buckets = [
            {"from": self.edges[i], "to": self.edges[i + 1], "tokens": n,
             "loss": (s / n) if n else None}
            for i, (s, n) in enumerate(zip(self.bucket_nll, self.bucket_tokens, strict=True))
        ]  # fmt: skip
        return {
            "documents": self.documents, "tokens": self.tokens, "loss": self.loss,
            "perplexity": self.perplexity, "buckets": buckets, "state_bytes": self.state_bytes,
            "seconds": self.seconds, "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
        }  # fmt: skip


@torch.no_grad()
def evaluate_sequence(
    model: nn.Module, ids: torch.Tensor, window: int, result: EvalResult | None = None,
    context: int | None = None,
) -> EvalResult:
    """ids: (B, N + 1) token ids; scores labels ids[:, 1:] from inputs ids[:, :-1], streamed
    `window` inputs per call (the evaluation window) with the state carried. Adds into `result`
    (a new one if None)."""
    check_window(context, window)
    n = ids.shape[1] - 1
    result = result or EvalResult(bucket_edges(context or n))
    spec = arch_spec(model.cfg.arch)
    block = spec.call_multiple(model.cfg)
    if window % block:
        raise InferenceError(f"--chunk {window} must be a multiple of {block} (model.block_size) for "
                             f"model.arch={model.cfg.arch}")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    state = None
    try:
        for start in range(0, n, window):
            end = min(start + window, n)
            x, y = ids[:, start:end], ids[:, start + 1 : end + 1]
            real = x.shape[1]
            pad = -real % block  # only the last BRT window: padding after every scored token
            if pad:
                x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
                y = torch.cat([y, y.new_zeros(y.shape[0], pad)], dim=1)
            out = model(x, y, state=state, retention_mode=spec.prefill_form)
            state = out.state
            result.add(out.loss[:, :real], start)
    finally:
        model.train(was_training)
    result.seconds += time.perf_counter() - t0
    result.documents += ids.shape[0]
    result.state_bytes = max(result.state_bytes, 0 if state is None else state.nbytes)
    return result


def evaluate_documents(
    model: nn.Module, documents: Iterable[np.ndarray | Sequence[int]], context: int, window: int,
    min_tokens: int = 2, device: torch.device | str = "cpu",
) -> EvalResult:
    """Each document (skipped below min_tokens, then truncated to context + 1 tokens) streamed alone."""
    check_window(context, window)
    result = EvalResult(bucket_edges(context))
    for doc in documents:
        if len(doc) < max(min_tokens, 2):
            continue
        doc = np.asarray(doc, dtype=np.int64)[: context + 1]
        evaluate_sequence(model, torch.from_numpy(doc)[None].to(device), window, result)
    return result


def iter_documents(shards: ShardSet) -> Iterator[np.ndarray]:
    """The documents of one split, reassembled in order from its samples.

    segments mode: `<bos> doc <eos>` from the doc_table's consecutive segments (overlapping by
    one token, the last padded to `n` real tokens). packed mode: the `<eos>`-joined stream
    (samples overlap by one token) cut at the recorded document starts; the stream's tail that
    did not fill a sample was dropped when the shards were written, so the last document may
    be cut short.
    """
    if shards.mode == "segments":
        for first, n_seg in shards.doc_table():
            parts = []
            for s in range(n_seg):
                tokens, meta = shards.read_global(first + s)
                seg = tokens[: meta["n"]].astype(np.int64)
                parts.append(seg if s == 0 else seg[1:])
            yield np.concatenate(parts)
        return
    current: list[np.ndarray] = []  # pieces of the document being read
    for i in range(shards.num_samples):
        tokens, meta = shards.read_usable(i)
        tokens = tokens.astype(np.int64)
        body = tokens if i == shards.num_samples - 1 else tokens[:-1]  # the overlap opens sample i + 1
        prev = 0
        for s in sorted(s for s in meta["starts"] if s < len(body)):
            if s > prev:
                current.append(body[prev:s])
            if current:
                yield np.concatenate(current)
                current = []
            prev = s
        current.append(body[prev:])
    if current:
        yield np.concatenate(current)
