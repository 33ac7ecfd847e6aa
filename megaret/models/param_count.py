"""Closed-form parameter counts, to check built models and to plan memory."""

from __future__ import annotations

from megaret.config import ModelConfig


def retnet_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of `RetNet(cfg)` (all TP shards together).

    Per layer: W_Q, W_K (d x d), W_V, W_G (d x vd), W_O (vd x d) = (2 + 3v) d^2, the FFN
    (2 d f for gelu, 3 d f for SwiGLU; no biases) and two pre-norms.
    """
    d, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.value_factor
    norm = 2 * d if cfg.norm_type == "layernorm" else d
    retention = (2 + 3 * v) * d * d
    ffn = (3 if cfg.ffn_type == "swiglu" else 2) * d * f
    layer = retention + ffn + 2 * norm
    embedding = cfg.vocab_size * d
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.num_layers * layer + embedding + output + norm
