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


def _norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size if cfg.norm_type == "layernorm" else cfg.hidden_size


def _ffn_params(cfg: ModelConfig, width: int | None = None) -> int:
    """Up (and SwiGLU gate) d -> f and down f -> d, no biases."""
    f = cfg.ffn_hidden_size if width is None else width
    return (3 if cfg.ffn_type == "swiglu" else 2) * cfg.hidden_size * f


def _gate_params(cfg: ModelConfig, in_features: int) -> int:
    """Gate: fixed W_z (in x d), b_z, b_g; lstm W_z/W_i/W_f (in x 3d) and their biases."""
    d = cfg.hidden_size
    return in_features * d + 2 * d if cfg.gate_type == "fixed" else 3 * (in_features * d + d)


def _shell_params(cfg: ModelConfig) -> int:
    """Embedding, output head (unless tied) and final norm."""
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    return cfg.vocab_size * cfg.hidden_size + output + _norm_params(cfg)


def attention_layer_param_count(cfg: ModelConfig) -> int:
    """A Transformer block: W_Q, W_K, W_V, W_O (4 d^2), the FFN and two pre-norms."""
    return 4 * cfg.hidden_size**2 + _ffn_params(cfg) + 2 * _norm_params(cfg)


def recurrent_layer_param_count(cfg: ModelConfig) -> int:
    """A BRT recurrent layer.

    Tokens: self-attention q, shared k/v, cross q (4 d^2), W_o over [self; cross] (2 d^2),
    FFN, two norms. States: self q, cross q, shared k/v (4 d^2), a norm, the gate over the
    concatenated attentions (2d in), S x d state IDs and initial state; unless skip, a norm,
    the MLP up projection(s) and a second gate whose W_z is the MLP's down projection. Plus a
    learned scale per head for each of the four query sets.
    """
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    tokens = 6 * d * d + _ffn_params(cfg) + 2 * _norm_params(cfg)
    states = 4 * d * d + _norm_params(cfg) + _gate_params(cfg, 2 * d) + 2 * cfg.num_states * d
    if not cfg.state_skip:
        up = (2 if cfg.ffn_type == "swiglu" else 1) * d * f
        states += _norm_params(cfg) + up + _gate_params(cfg, f)
    return tokens + states + 4 * cfg.num_heads


def transformer_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of `Transformer(cfg)` (causal or sliding: windows add none)."""
    return cfg.num_layers * attention_layer_param_count(cfg) + _shell_params(cfg)


def brt_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of `BlockRecurrentTransformer(cfg)`."""
    rec = len(cfg.recurrent_layer_indices)
    return ((cfg.num_layers - rec) * attention_layer_param_count(cfg) + rec * recurrent_layer_param_count(cfg)
            + _shell_params(cfg))


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count of the model `build_model(cfg, ...)` builds."""
    if cfg.arch == "retnet":
        return retnet_param_count(cfg)
    if cfg.arch == "brt":
        return brt_param_count(cfg)
    return transformer_param_count(cfg)
