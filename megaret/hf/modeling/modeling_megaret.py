"""Standalone Hugging Face modeling code for megaret models: RetNet, the Transformer baselines
(causal and block-windowed) and the Block-Recurrent Transformer.

Imports torch and transformers only, never megaret: `python -m megaret.export --format hf` copies
this file (and configuration_megaret.py) beside the weights, so that

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)

loads the model anywhere. The math repeats megaret's (megaret/ops/retention.py,
megaret/ops/attention.py, megaret/models/) in its plainest form, batch-first, one process; the
weights keep megaret's names. megaret's tests compare these logits with megaret's at fp32 and
generate()'s greedy tokens with megaret.generate.

What a call carries to the next (`MegaretCache`), so generate() never recomputes the past:
- retnet: per layer the retention state S (B, H, Dk, Dv); each new token is one O(1) step;
- transformer: per layer the rotated keys and values of every token so far (a KV cache);
- sliding: the keys and values of the previous and the current block (all the window sees);
- brt: per layer the same window (and a recurrent layer's S state vectors) at the last
  completed block boundary; the tokens after it wait in `pending` and are re-run, padded to a
  block, at each call: a recurrent layer reads block i's state only once block i - 1 is whole.

Not supported: padded batches (an attention_mask with zeros) and beam search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_megaret import MegaretConfig

# ---------------------------------------------------------------------------------------------
# shared pieces


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def build_norm(config: MegaretConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, config.norm_eps)


class FeedForward(nn.Module):
    """gelu: down(gelu(up x)); swiglu: down(silu(gate x) * up x)."""

    def __init__(self, config: MegaretConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.up = nn.Linear(d, f, bias=False)
        self.gate = nn.Linear(d, f, bias=False) if config.ffn_type == "swiglu" else None
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        return self.down(F.gelu(up) if self.gate is None else F.silu(self.gate(x)) * up)


def rotate(x: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """Rotary positions: x (B, T, H, D) at absolute positions position..; the interleaved channel
    pair (2i, 2i + 1) turns by n * base^(-2i/D) at position n (angles in float64)."""
    t, d = x.shape[1], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # (D/2,)
    pos = torch.arange(t, dtype=torch.float64, device=x.device) + position  # (T,)
    angles = pos[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = angles.cos().to(x.dtype)[None, :, None, :]  # (1, T, 1, D/2)
    sin = angles.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, H, D/2) each
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# RetNet: multi-scale retention


def log_decays(num_heads: int, schedule: str) -> torch.Tensor:
    """log(gamma_h) (H,), float32: retnet: gamma_h = 1 - 2^(-5-h); loglinear: 1 - gamma from 1/32
    to 1/512, log-spaced (computed in float64)."""
    h = torch.arange(num_heads, dtype=torch.float64)
    if schedule == "retnet":
        return torch.log1p(-torch.exp2(-5.0 - h)).float()
    if schedule == "loglinear":
        span = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
        one_minus = torch.exp(span)
        return torch.log1p(-one_minus).float()
    raise ValueError(f"decay_schedule: unknown {schedule!r}; use retnet or loglinear")


def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Retention over T tokens at once, after the state S_0 of the tokens before them:

        o_t = sum_{s <= t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_0
        S_T = gamma^T S_0 + sum_s gamma^(T-1-s) k_s^T v_s

    q, k: (B, T, H, Dk); v: (B, T, H, Dv); log_decay (H,); state (B, H, Dk, Dv) or None (zeros)
    -> o (B, T, H, Dv) and S_T, in float32. Every decay factor is gamma^e with e >= 0."""
    t = q.shape[1]
    qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))  # (B, H, T, D*)
    pos = torch.arange(t, dtype=torch.float32, device=q.device)  # (T,)
    diff = pos[:, None] - pos[None, :]  # (T, T): t - s
    expo = torch.where(diff >= 0, diff[None] * log_decay[:, None, None], float("-inf"))  # (H, T, T)
    scores = (qh @ kh.transpose(-1, -2)) * torch.exp(expo)  # (B, H, T, T), 0 above the diagonal
    o = scores @ vh  # (B, H, T, Dv)
    zeta = torch.exp((t - 1 - pos)[None, :] * log_decay[:, None])  # (H, T): gamma^(T-1-s)
    new_state = kh.transpose(-1, -2) @ (vh * zeta[None, :, :, None])  # (B, H, Dk, Dv)
    if state is not None:
        xi = torch.exp((pos + 1)[None, :] * log_decay[:, None])  # (H, T): gamma^(t+1)
        o = o + (qh @ state) * xi[None, :, :, None]
        new_state = new_state + torch.exp(t * log_decay)[None, :, None, None] * state
    return o.transpose(1, 2), new_state


def retention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                   state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token, O(1) in the context: S' = gamma S + k^T v, o = q S'. q, k: (B, H, Dk);
    v: (B, H, Dv); state (B, H, Dk, Dv) or None -> (o (B, H, Dv), S'), float32."""
    q, k, v = q.float(), k.float(), v.float()
    kv = k[..., :, None] * v[..., None, :]  # (B, H, Dk, Dv)
    new_state = kv if state is None else state * torch.exp(log_decay)[None, :, None, None] + kv
    return (q[..., None, :] @ new_state)[..., 0, :], new_state


class Retention(nn.Module):
    """MSR(X) = (swish(X W_G) * GroupNorm_h(Retention(X W_Q, X W_K, X W_V))) W_O."""

    def __init__(self, config: MegaretConfig) -> None:
        super().__init__()
        d, h, vf = config.hidden_size, config.num_attention_heads, config.value_factor
        self.heads, self.key_dim, self.value_dim = h, d // h, vf * d // h
        self.base, self.eps, self.chunk = config.rotary_base, config.norm_eps, config.chunk_size
        self.schedule = config.decay_schedule
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, vf * d, bias=False)
        self.g_proj = nn.Linear(d, vf * d, bias=False)
        self.out_proj = nn.Linear(vf * d, d, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None, position: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d), state (B, H, Dk, Dv) or None -> ((B, T, d), the state after x)."""
        b, t, _ = x.shape
        q = rotate(self.q_proj(x).view(b, t, self.heads, self.key_dim), position, self.base)  # (B, T, H, Dk)
        k = rotate(self.k_proj(x).view(b, t, self.heads, self.key_dim), position, self.base)
        k = k * self.key_dim**-0.5
        v = self.v_proj(x).view(b, t, self.heads, self.value_dim)  # (B, T, H, Dv)
        log_decay = log_decays(self.heads, self.schedule).to(x.device)  # (H,)
        if t == 1:  # one decoding step
            o, state = retention_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state)
            o = o[:, None]  # (B, 1, H, Dv)
        else:  # a prompt: the parallel form, chunk by chunk (memory O(chunk^2), not O(T^2))
            outs = []
            for s in range(0, t, self.chunk):
                part = slice(s, s + self.chunk)
                o, state = parallel_retention(q[:, part], k[:, part], v[:, part], log_decay, state)
                outs.append(o)
            o = torch.cat(outs, dim=1)  # (B, T, H, Dv)
        y = F.layer_norm(o, (self.value_dim,), eps=self.eps).to(x.dtype)  # per-head norm, no affine
        y = y.reshape(b, t, self.heads * self.value_dim)  # (B, T, H*Dv)
        return self.out_proj(F.silu(self.g_proj(x)) * y), state


class RetNetBlock(nn.Module):
    def __init__(self, config: MegaretConfig) -> None:
        super().__init__()
        self.retention_norm = build_norm(config)
        self.retention = Retention(config)
        self.ffn_norm = build_norm(config)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None, position: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.retention(self.retention_norm(x), state, position)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


# ---------------------------------------------------------------------------------------------
# attention: causal or block-windowed, with a KV cache

KV = tuple[torch.Tensor, torch.Tensor]  # rotated keys and values (B, H, L, D) of earlier tokens


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(Tq, Tk) bool: a query at position p sees key s when s <= p and, with a block window W,
    s // W >= p // W - 1 (the previous block and the causal part of its own)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= (k_pos // window)[None, :] >= (q_pos // window)[:, None] - 1
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KV | None, position: int,
           window: int | None, scale: float | None = None) -> tuple[torch.Tensor, KV]:
    """q, k, v: (B, H, T, D) of the tokens at position..; cache: the keys and values before them
    -> (o (B, H, T, D), the keys and values the next call can still see)."""
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, S, D)
    t, s = q.shape[2], k.shape[2]
    if window is None and s == t:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale)
    elif window is None and t == 1:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # one query sees every key
    else:
        q_pos = torch.arange(position, position + t, device=q.device)
        k_pos = torch.arange(position + t - s, position + t, device=q.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible(q_pos, k_pos, window), scale=scale)
    if window is not None:  # the next token sees from the start of the previous block on
        end = position + t
        keep = min(s, end - max(0, (end // window - 1) * window))
        k, v = k[:, :, s - keep:], v[:, :, s - keep:]
    return o, (k, v)


class Attention(nn.Module):
    """Multi-head causal self-attention (block-windowed with `window`), rotary positions."""

    def __init__(self, config: MegaretConfig, window: int | None) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.base, self.window = config.rotary_base, window
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cache: KV | None, position: int) -> tuple[torch.Tensor, KV]:
        """x: (B, T, d) -> ((B, T, d), the cache for the next call)."""
        b, t, _ = x.shape
        shape = (b, t, self.heads, self.head_dim)
        q = rotate(self.q_proj(x).view(shape), position, self.base).transpose(1, 2)  # (B, H, T, D)
        k = rotate(self.k_proj(x).view(shape), position, self.base).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        o, cache = attend(q, k, v, cache, position, self.window)  # (B, H, T, D)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, -1)), cache


class TransformerBlock(nn.Module):
    def __init__(self, config: MegaretConfig, window: int | None) -> None:
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = Attention(config, window)
        self.ffn_norm = build_norm(config)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, cache: KV | None, position: int) -> tuple[torch.Tensor, KV]:
        y, cache = self.attention(self.attention_norm(x), cache, position)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), cache


# ---------------------------------------------------------------------------------------------
# Block-Recurrent Transformer: the recurrent layer (Hutchins et al. 2022)


class HeadScale(nn.Module):
    """scale_h * q / |q|: a learned temperature per head for unit queries (keys are unit too)."""

    def __init__(self, config: MegaretConfig) -> None:
        super().__init__()
        d = config.hidden_size // config.num_attention_heads
        self.weight = nn.Parameter(torch.full((config.num_attention_heads,), float(d) ** 0.5))  # (H,)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, D) -> the same shape."""
        return F.normalize(q, dim=-1) * self.weight.to(q.dtype)[None, :, None, None]


class Gate(nn.Module):
    """The state path's residual: fixed: c g + z (1 - g), z = W h + b, g = sigmoid(b_g);
    lstm: c sigmoid(f + 1) + tanh(z) sigmoid(i - 1), [z, i, f] = W h + b."""

    def __init__(self, kind: str, in_features: int, hidden: int) -> None:
        super().__init__()
        n = 1 if kind == "fixed" else 3
        self.proj = nn.Linear(in_features, n * hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(n * hidden))
        self.gate_bias = nn.Parameter(torch.ones(hidden)) if kind == "fixed" else None

    def forward(self, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """c: (B, S, d), h: (B, S, in) -> (B, S, d)."""
        y = self.proj(h) + self.bias
        if self.gate_bias is not None:
            g = torch.sigmoid(self.gate_bias)
            return c * g + y * (1 - g)
        z, i, f = y.chunk(3, dim=-1)
        return c * torch.sigmoid(f + 1) + torch.tanh(z) * torch.sigmoid(i - 1)


@dataclass
class RecurrentState:
    """What a BRT recurrent layer carries: its S states and the window's keys and values."""

    states: torch.Tensor  # (B, S, d)
    cache: KV


class RecurrentBlock(nn.Module):
    """Tokens: [window self-attention ; cross-attention to the states] W_o, residual, FFN.
    States, once per block of W tokens: [self-attention ; cross-attention to the block's tokens]
    through a gate (and a gated MLP unless state_skip). Queries and keys are unit vectors with a
    learned scale per head; keys and values are shared by the two attentions of each side."""

    def __init__(self, config: MegaretConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.block, self.base = config.block_size, config.rotary_base
        self.token_norm = build_norm(config)
        self.attn = nn.Module()  # megaret's names: attn.{q,k,v,out}_proj, attn.qk_scale
        self.attn.q_proj = nn.Linear(d, d, bias=False)
        self.attn.k_proj = nn.Linear(d, d, bias=False)
        self.attn.v_proj = nn.Linear(d, d, bias=False)
        self.attn.out_proj = nn.Linear(2 * d, d, bias=False)  # per head [self ; cross]
        self.attn.qk_scale = HeadScale(config)
        self.token_cross_q = nn.Linear(d, d, bias=False)
        self.token_cross_scale = HeadScale(config)
        self.ffn_norm = build_norm(config)
        self.ffn = FeedForward(config)
        self.state_norm = build_norm(config)
        self.state_q = nn.Linear(d, d, bias=False)
        self.state_cross_q = nn.Linear(d, d, bias=False)
        self.state_k = nn.Linear(d, d, bias=False)
        self.state_v = nn.Linear(d, d, bias=False)
        self.state_scale = HeadScale(config)
        self.state_cross_scale = HeadScale(config)
        self.state_gate = Gate(config.gate_type, 2 * d, d)
        self.state_skip = config.state_skip
        if not config.state_skip:
            self.state_mlp_norm = build_norm(config)
            self.state_mlp_up = nn.Linear(d, f, bias=False)
            self.state_mlp_glu = nn.Linear(d, f, bias=False) if config.ffn_type == "swiglu" else None
            self.state_mlp_gate = Gate(config.gate_type, f, d)  # its W_z is the MLP's down projection
        self.state_ids = nn.Parameter(torch.zeros(config.num_states, d))  # (S, d)
        self.initial_state = nn.Parameter(torch.zeros(config.num_states, d))  # (S, d)

    def heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, H*D) -> (B, H, T, D)."""
        b, t, _ = y.shape
        return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D') -> (B, T, H*D'), each head's channels together."""
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, -1)

    def state_heads(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (B, S, d) -> state self and cross queries, unit keys, values: (B, H, S, D) each."""
        s = self.state_norm(c + self.state_ids)
        q = self.state_scale(self.heads(self.state_q(s)))
        qc = self.state_cross_scale(self.heads(self.state_cross_q(s)))
        k = F.normalize(self.heads(self.state_k(s)), dim=-1)
        return q, qc, k, self.heads(self.state_v(s))

    def state_mlp(self, c: torch.Tensor) -> torch.Tensor:
        h = self.state_mlp_norm(c)
        up = self.state_mlp_up(h)
        hidden = F.gelu(up) if self.state_mlp_glu is None else F.silu(self.state_mlp_glu(h)) * up
        return self.state_mlp_gate(c, hidden)

    def forward(self, x: torch.Tensor, state: RecurrentState | None, position: int
                ) -> tuple[torch.Tensor, RecurrentState]:
        """x: (B, T, d), T a multiple of W, starting on a block boundary -> ((B, T, d), new state)."""
        b, t, _ = x.shape
        w, a = self.block, self.attn
        c = self.initial_state[None].expand(b, -1, -1) if state is None else state.states  # (B, S, d)
        h = self.token_norm(x)
        q = a.qk_scale(self.heads(a.q_proj(h)))  # (B, H, T, D) token self-attention queries
        qc = self.token_cross_scale(self.heads(self.token_cross_q(h)))  # token -> state queries
        k = F.normalize(self.heads(a.k_proj(h)), dim=-1)  # unit token keys, shared
        v = self.heads(a.v_proj(h))  # token values, shared

        def rot(y: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) rotated at positions position..
            return rotate(y.transpose(1, 2), position, self.base).transpose(1, 2)

        o_self, cache = attend(rot(q), rot(k), v, None if state is None else state.cache, position, w, 1.0)
        o_cross = []
        for i in range(t // w):  # the state path runs block by block
            blk = slice(i * w, (i + 1) * w)
            sq, sqc, sk, sv = self.state_heads(c)
            o_cross.append(F.scaled_dot_product_attention(qc[:, :, blk], sk, sv, scale=1.0))  # (B, H, W, D)
            s_self = F.scaled_dot_product_attention(sq, sk, sv, scale=1.0)  # (B, H, S, D)
            s_cross = F.scaled_dot_product_attention(sqc, k[:, :, blk], v[:, :, blk], scale=1.0)
            c = self.state_gate(c, self.merge(torch.cat([s_self, s_cross], dim=-1)))  # (B, S, d)
            if not self.state_skip:
                c = self.state_mlp(c)
        o = torch.cat([o_self, torch.cat(o_cross, dim=2)], dim=-1)  # (B, H, T, 2D)
        x = x + a.out_proj(self.merge(o))
        return x + self.ffn(self.ffn_norm(x)), RecurrentState(c, cache)


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class MegaretCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    cache: MegaretCache | None = None


class MegaretCache:
    """The per-layer states after `position` tokens (the module docstring says what each arch
    keeps), and the tokens after that point that wait for a block to fill (brt only)."""

    def __init__(self, layers: list, position: int, pending: torch.Tensor | None = None) -> None:
        self.layers, self.position, self.pending = layers, position, pending

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far."""
        return self.position + (0 if self.pending is None else self.pending.shape[1])


class MegaretPreTrainedModel(PreTrainedModel):
    config_class = MegaretConfig
    base_model_prefix = "megaret"
    _no_split_modules = ["RetNetBlock", "TransformerBlock", "RecurrentBlock"]
    _is_stateful = True  # no assisted decoding: a state cannot be rolled back

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HeadScale):
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            init.constant_(module.weight, float(head_dim) ** 0.5)
        elif isinstance(module, Gate):
            init.zeros_(module.bias)
            if module.gate_bias is not None:
                init.ones_(module.gate_bias)
        elif isinstance(module, RecurrentBlock):
            init.normal_(module.state_ids, std=self.config.initializer_range)
            init.normal_(module.initial_state, std=1.0)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class MegaretForCausalLM(MegaretPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"output.weight": "embedding.weight"}

    def __init__(self, config: MegaretConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self._layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = build_norm(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # calls hold whole blocks (brt: a recurrent layer needs block i - 1 whole for block i)
        self.call_multiple = config.block_size if config.arch == "brt" else 1
        self.post_init()

    @staticmethod
    def _layer(config: MegaretConfig, index: int) -> nn.Module:
        if config.arch == "retnet":
            return RetNetBlock(config)
        if config.arch == "brt" and index in config.recurrent_layers:
            return RecurrentBlock(config)
        return TransformerBlock(config, None if config.arch == "transformer" else config.block_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.output = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: the model returns its own MegaretCache

    def stack(self, tokens: torch.Tensor, layer_states: list | None, position: int
              ) -> tuple[torch.Tensor, list]:
        """tokens (B, T) at position.. -> hidden states (B, T, d) after the last layer, and every
        layer's new state."""
        x = self.embedding(tokens)  # (B, T, d)
        layer_states = [None] * len(self.layers) if layer_states is None else layer_states
        new_states = []
        for layer, s in zip(self.layers, layer_states, strict=True):
            x, s = layer(x, s, position)
            new_states.append(s)
        return x, new_states

    def run(self, tokens: torch.Tensor, cache: MegaretCache | None) -> tuple[torch.Tensor, MegaretCache]:
        """tokens (B, T) after the cache's -> hidden states (B, T, d) and the cache after them.

        Whole blocks advance the state; a partial block (brt) runs padded to a block from the
        state at its start (the padding comes after its tokens, so causality hides it) and waits
        in `pending` to be run again with the tokens that complete it."""
        w = self.call_multiple
        states, position = (None, 0) if cache is None else (cache.layers, cache.position)
        pending = None if cache is None else cache.pending
        buf = tokens if pending is None else torch.cat([pending, tokens], dim=1)  # (B, r + T)
        full = buf.shape[1] // w * w
        hidden = []
        if full:
            h, states = self.stack(buf[:, :full], states, position)
            hidden.append(h)
            position += full
        rest = buf[:, full:]
        if rest.shape[1]:
            padded = torch.cat([rest, rest.new_zeros(rest.shape[0], w - rest.shape[1])], dim=1)
            h, _ = self.stack(padded, states, position)  # the state stays at the block boundary
            hidden.append(h[:, : rest.shape[1]])
        x = torch.cat(hidden, dim=1)[:, buf.shape[1] - tokens.shape[1]:]  # the new tokens' only
        return x, MegaretCache(states, position, rest if rest.shape[1] else None)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: MegaretCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: MegaretCache | None = None,
        **kwargs,
    ) -> MegaretCausalLMOutput | tuple:
        """input_ids (B, T): the tokens after `cache`'s (None: a fresh sequence) -> logits (B, T, V)
        (the last `logits_to_keep` positions when given), the mean next-token loss with `labels`
        (shifted inside, -100 ignored) and, with use_cache, the cache after these tokens."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has zeros: padded batches are not supported (the recurrent "
                             "state would absorb the padding); run sequences of one length, or one at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x, new_cache = self.run(input_ids, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output(self.final_norm(x))  # (B, T, V)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].flatten().to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100)
        out = MegaretCausalLMOutput(loss, logits, new_cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: MegaretCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      past_key_values: MegaretCache | None = None, **kwargs) -> dict:
        """Only the tokens the cache has not seen (the whole prompt first, then one token)."""
        cache = cache if cache is not None else past_key_values
        inputs = {"use_cache": use_cache, "logits_to_keep": kwargs.get("logits_to_keep", 0)}
        if cache is None:
            return {**inputs, "input_ids": input_ids, "attention_mask": attention_mask}
        return {**inputs, "input_ids": input_ids[:, cache.get_seq_length():], "cache": cache}
