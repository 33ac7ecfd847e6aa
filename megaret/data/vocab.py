"""The model's vocabulary from the data's tokenizer: ``model.vocab_size`` padded, the padding masked.

``model.vocab_size: null`` (the default) takes the tokenizer's id count from the data manifests and
pads it up to a multiple of ``model.vocab_multiple`` (128 by default; like Megatron's
make-vocab-size-divisible-by, but independent of the parallel layout, so the same data gives the same
model under any TP). ``model.tokenizer_vocab_size`` records the tokenizer's count: the output
layer's logits of the padded ids above it are -inf (never predicted, no softmax mass). The trainer
resolves both once before the first step (:func:`resolve_vocab`); the resolved values go into
run.dir/config.yaml and every checkpoint's config and identity, so a resume, a reshard or an export
keeps the same shapes.
"""

from __future__ import annotations

from typing import Any

from megaret.config.schema import ConfigError

#: the model vocabulary without a tokenizer to size it (synthetic data), and the size the default
#: corpus's tokenizer is trained to when model.vocab_size is null
DEFAULT_VOCAB = 32000


def padded_vocab_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def default_corpus_vocab(cfg: Any) -> int:
    """The vocabulary the default corpus's tokenizer is trained to (data.default_corpus_vocab, else an
    explicit model.vocab_size, else :data:`DEFAULT_VOCAB`)."""
    return cfg.data.default_corpus_vocab or cfg.model.vocab_size or DEFAULT_VOCAB


def data_tokenizer_vocab(cfg: Any) -> int | None:
    """The most ids any of the data's tokenizers has (from the manifests; None: synthetic data)."""
    if cfg.data.source == "synthetic":
        return None
    from megaret.data.from_config import resolve_manifests
    from megaret.data.shards import load_manifest

    return max(load_manifest(loc)[0]["tokenizer"]["vocab_size"] for loc in resolve_manifests(cfg))


def resolve_vocab(cfg: Any, tokenizer_vocab: int | None = None, *, read_data: bool = True) -> None:
    """Fill model.vocab_size (if null) and model.tokenizer_vocab_size from the data's tokenizer.

    ``tokenizer_vocab``: the tokenizer's id count when the caller knows it; else it is read from the
    data manifests (building the default corpus on first use) when ``read_data``. A padded size the
    tensor-parallel size does not divide, or a tokenizer larger than an explicit model.vocab_size,
    is a ConfigError naming the fix.
    """
    m, tp = cfg.model, cfg.parallel.tensor
    if cfg.data.source != "synthetic" and not cfg.data.paths and cfg.data.default_corpus_vocab is None:
        cfg.data.default_corpus_vocab = default_corpus_vocab(cfg)  # fixed before vocab_size is filled
    n = tokenizer_vocab
    if n is None and read_data:
        n = data_tokenizer_vocab(cfg)
    if m.vocab_size is None:
        padded = padded_vocab_size(n or default_corpus_vocab(cfg), m.vocab_multiple)
        if padded % tp:
            raise ConfigError(
                f"model.vocab_size=null pads the tokenizer's ids to {padded}, a multiple of "
                f"model.vocab_multiple={m.vocab_multiple} that parallel.tensor={tp} does not divide; set "
                f"model.vocab_multiple to a multiple of {tp} (e.g. {padded_vocab_size(m.vocab_multiple, tp)})"
            )
        m.vocab_size = padded
    if n is not None:
        if n > m.vocab_size:
            raise ConfigError(f"the data's tokenizer has {n} ids but model.vocab_size={m.vocab_size}; set "
                              f"model.vocab_size >= {n} (e.g. {padded_vocab_size(n, m.vocab_multiple)}) or "
                              "model.vocab_size=null to size it from the tokenizer")
        if m.tokenizer_vocab_size is None:
            m.tokenizer_vocab_size = n
    cfg.validate()


def vocab_fields(cfg: Any) -> tuple[int | None, int | None, int | None]:
    """What :func:`resolve_vocab` fills, to hand to other ranks (:func:`apply_vocab_fields`)."""
    return cfg.model.vocab_size, cfg.model.tokenizer_vocab_size, cfg.data.default_corpus_vocab


def apply_vocab_fields(cfg: Any, fields: tuple[int | None, int | None, int | None]) -> None:
    cfg.model.vocab_size, cfg.model.tokenizer_vocab_size, cfg.data.default_corpus_vocab = fields
    cfg.validate()
