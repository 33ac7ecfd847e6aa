"""The Block-Recurrent Transformer's recurrent layer (Hutchins et al. 2022, arXiv 2203.07852).

A segment is cut into blocks of W tokens; S state vectors of width d are carried from
block to block. For block i with state c_i (the state left by block i - 1):

  vertical (tokens):   [SelfAttn_window(tokens) ; CrossAttn(tokens -> c_i)] W_o, residual, MLP
  horizontal (states): h = [SelfAttn(c_i) ; CrossAttn(c_i -> tokens of block i)]
                       c_{i+1} = gate(c_i, h)  (then gate(., MLP(.)) unless state_skip)

Keys/values are computed once per side and shared by both paths (token k/v serve token
self-attention and state->token cross-attention; state k/v serve state self-attention and
token->state cross-attention); each path has its own queries. Queries and keys are
L2-normalised with a learned per-head scale. Learned state IDs are added to the state
before its projections (states have no positions otherwise); a learned initial state is
restored at document starts. Rotary positions apply only to token self-attention.

Under TP each rank holds H / tp heads of every attention; the per-head outputs of the two
attentions are interleaved per head before the row-parallel projection, so a rank's
contiguous input slice is exactly its heads and any TP size computes the same function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.config.schema import GateType, check_choice
from megaret.models.attention_layer import HeadScale, KVCache, SelfAttention, windowed_self_attention
from megaret.models.dropout import ResidualDropout
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.parallel_linear import column, row
from megaret.models.state import tensor_bytes, to_device
from megaret.ops.attention import key_masked_attention
from megaret.parallel.context import TensorParallel


@dataclass
class BRTLayerState:
    """What the recurrent layer carries to the next segment."""

    state: torch.Tensor  # (B, S, d) recurrent state after the last block (same on every TP rank)
    cache: KVCache  # the last block's token keys (rotated) and values, (B, H_local, W, D)
    # (B,) bool or None: samples whose next segment starts a new document (the layer then
    # restores its learned initial state for them; `reset` sets it)
    fresh: torch.Tensor | None = None

    state_keys = ("state", "cache")  # (fresh is optional)

    def detach(self) -> BRTLayerState:
        return BRTLayerState(self.state.detach(), self.cache.detach(), self.fresh)

    def reset(self, mask: torch.Tensor | None) -> BRTLayerState:
        """Flagged samples (mask (B,) bool) drop the cached block and restart from the initial state."""
        if mask is None:
            return self
        mask = mask.bool()
        fresh = mask if self.fresh is None else self.fresh | mask
        return BRTLayerState(self.state, self.cache.reset(mask), fresh)

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.state, self.fresh) + self.cache.nbytes

    def state_dict(self) -> dict:
        out = {"state": self.state.detach().cpu().clone(), "cache": self.cache.state_dict()}
        if self.fresh is not None:
            out["fresh"] = self.fresh.cpu().clone()
        return out

    @classmethod
    def from_state_dict(cls, d: dict, device: torch.device | str | None = None) -> BRTLayerState:
        fresh = d.get("fresh")
        return cls(to_device(d["state"], device), KVCache.from_state_dict(d["cache"], device),
                   None if fresh is None else to_device(fresh, device))


class Gate(nn.Module):
    """Replaces the residual connection on the state path.

    fixed: z = W_z h + b_z; g = sigmoid(b_g); c' = c * g + z * (1 - g)
    lstm:  z = tanh(W_z h + b_z); i = sigmoid(W_i h + b_i - 1); f = sigmoid(W_f h + b_f + 1);
           c' = c * f + z * i
    h arrives split across TP ranks (heads or MLP units); W_z/W_i/W_f are one row-parallel
    projection, so the result is all-reduced and identical on every rank.
    """

    def __init__(self, kind: str, in_features: int, hidden: int, config: TransformerConfig,
                 tp: TensorParallel) -> None:
        super().__init__()
        check_choice("model.gate_type", kind, GateType)
        self.kind = kind
        n = 1 if kind == "fixed" else 3
        self.proj = row(in_features, n * hidden, config, tp)
        self.bias = nn.Parameter(torch.zeros(n * hidden))
        # fixed gate: sigmoid(1) ~ 0.73 of the old state kept at initialisation
        self.gate_bias = nn.Parameter(torch.ones(hidden)) if kind == "fixed" else None

    def forward(self, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """c: (S, B, d), h: (S, B, in / tp) -> (S, B, d)."""
        y, _ = self.proj(h)
        y = y + self.bias
        if self.gate_bias is not None:
            g = torch.sigmoid(self.gate_bias)
            return c * g + y * (1 - g)
        z, i, f = y.chunk(3, dim=-1)
        return c * torch.sigmoid(f + 1) + torch.tanh(z) * torch.sigmoid(i - 1)


def _without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """The same megatron config for linears whose input is not split along the sequence."""
    if not config.sequence_parallel:
        return config
    plain = copy.copy(config)
    plain.sequence_parallel = False
    return plain


def _replicated(norm: nn.Module) -> nn.Module:
    """Mark a norm whose input is whole on every TP rank (not a sequence shard)."""
    norm.replicated_input = True
    return norm


class RecurrentBlock(nn.Module):
    """One BRT recurrent layer: processes a block-aligned segment block by block."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel) -> None:
        super().__init__()
        d, heads = cfg.hidden_size, cfg.num_heads
        self.block_size = cfg.block_size
        self.num_states = cfg.num_states
        # token side: one attention helper gives heads/rotary/projection layout
        self.token_norm = build_norm(cfg.norm_type, d, cfg.norm_eps)
        self.attn = SelfAttention(d, heads, config, tp, window=cfg.block_size, rotary_base=cfg.rotary_base,
                                  qk_norm=True, concat=2)  # self-attention q, shared k/v, [self; cross] W_o
        self.token_cross_q = column(d, d, config, tp)
        self.token_cross_scale = HeadScale(heads, self.attn.head_dim, tp)
        self.ffn_norm = build_norm(cfg.norm_type, d, cfg.norm_eps)
        self.ffn = FeedForward(d, cfg.ffn_hidden_size, cfg.ffn_type, config, tp)
        # state side: the S states are whole on every TP rank, also under sequence parallelism
        # (which splits only the tokens), so its linears run plain TP and its norms are not tagged
        sc = _without_sequence_parallel(config)
        self.state_norm = _replicated(build_norm(cfg.norm_type, d, cfg.norm_eps))
        self.state_q = column(d, d, sc, tp)
        self.state_cross_q = column(d, d, sc, tp)
        self.state_k = column(d, d, sc, tp)
        self.state_v = column(d, d, sc, tp)
        self.state_scale = HeadScale(heads, self.attn.head_dim, tp)
        self.state_cross_scale = HeadScale(heads, self.attn.head_dim, tp)
        self.state_gate = Gate(cfg.gate_type, 2 * d, d, sc, tp)
        self.state_skip = cfg.state_skip
        if not cfg.state_skip:
            self.state_mlp_norm = _replicated(build_norm(cfg.norm_type, d, cfg.norm_eps))
            self.state_mlp_up = column(d, cfg.ffn_hidden_size, sc, tp)
            glu = cfg.ffn_type == "swiglu"
            self.state_mlp_glu = column(d, cfg.ffn_hidden_size, sc, tp) if glu else None
            self.state_mlp_gate = Gate(cfg.gate_type, cfg.ffn_hidden_size, d, sc, tp)  # W_z = MLP down
        self.state_ids = nn.Parameter(torch.empty(cfg.num_states, d))
        self.initial_state = nn.Parameter(torch.empty(cfg.num_states, d))
        nn.init.normal_(self.state_ids, std=cfg.init_std)
        nn.init.normal_(self.initial_state, std=1.0)  # unit scale, like the normed states it stands for
        self.dropout = ResidualDropout(cfg.dropout, config.sequence_parallel and tp.size > 1)

    # -- pieces -------------------------------------------------------------------------------

    def _state_heads(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (S, B, d) -> state self/cross queries (scaled unit), unit keys, values: (B, H, S, D)."""
        s = self.state_norm(c + self.state_ids[:, None, :])
        heads = self.attn.heads
        q = self.state_scale(heads(self.state_q(s)[0]))
        qc = self.state_cross_scale(heads(self.state_cross_q(s)[0]))
        k = F.normalize(heads(self.state_k(s)[0]), dim=-1)
        v = heads(self.state_v(s)[0])
        return q, qc, k, v

    def _state_mlp(self, c: torch.Tensor) -> torch.Tensor:
        """The gated MLP on the state path (absent in the skip variant)."""
        h = self.state_mlp_norm(c)
        up, _ = self.state_mlp_up(h)
        if self.state_mlp_glu is None:
            hidden = F.gelu(up)
        else:
            hidden = F.silu(self.state_mlp_glu(h)[0]) * up
        return self.state_mlp_gate(c, hidden)

    def initial(self, batch_size: int) -> torch.Tensor:
        """The learned initial state, (S, B, d)."""
        return self.initial_state[:, None, :].expand(-1, batch_size, -1)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, layer_state: BRTLayerState | None, position: int,
                doc: torch.Tensor | None = None) -> tuple[torch.Tensor, BRTLayerState]:
        """x: (T, B, d), T a multiple of W, starting on a block boundary -> ((T, B, d), new state).

        Samples the carried state marks `fresh` (a reset: they start a new document with this
        segment, their cached block already dropped) restart from the learned initial state.
        doc (B, T) long: document ids
        inside the segment (0 continues the carried state's document): no attention crosses a
        document start; tokens of a document that starts inside block i read the initial state
        instead of c_i, and the state leaving block i is the initial state updated with the
        block's last document only.
        """
        b, w = x.shape[1], self.block_size
        if layer_state is None:
            c, cache = self.initial(b), None
        else:
            c, cache = layer_state.state.transpose(0, 1), layer_state.cache
            if layer_state.fresh is not None:
                c = torch.where(layer_state.fresh[None, :, None], self.initial(b), c)  # (S, B, d)
        a = self.attn
        h = self.token_norm(x)
        q = a.qk_scale(a.heads(a.q_proj(h)[0]))  # (B, H, T, D) token self-attention queries
        qc = self.token_cross_scale(a.heads(self.token_cross_q(h)[0]))  # token -> state queries
        k = F.normalize(a.heads(a.k_proj(h)[0]), dim=-1)  # (B, H, T, D) shared token keys
        v = a.heads(a.v_proj(h)[0])  # shared token values
        t = q.shape[2]  # the full T (x is a T / tp shard under sequence parallelism)
        if t % w or position % w:
            raise ValueError(f"the BRT layer needs block-aligned calls: {t} tokens at position {position} "
                             f"with model.block_size={w}")
        o_self, new_cache = windowed_self_attention(
            a.rotate(q, position), a.rotate(k, position), v, cache, position, w, scale=1.0, doc=doc)
        o_cross = []
        fresh_heads = None if doc is None else self._state_heads(self.initial(b))
        for i in range(t // w):  # the only sequential part: the state path
            blk = slice(i * w, (i + 1) * w)
            heads = self._state_heads(c)  # sq, sqc, sk, sv: (B, H, S, D)
            read = F.scaled_dot_product_attention(qc[:, :, blk], heads[2], heads[3], scale=1.0)
            if doc is not None:  # documents starting inside this block
                d = doc[:, blk]  # (B, W)
                fresh = d > (doc[:, i * w - 1:i * w] if i else torch.zeros_like(d[:, :1]))  # (B, W)
                read_fresh = F.scaled_dot_product_attention(
                    qc[:, :, blk], fresh_heads[2], fresh_heads[3], scale=1.0)
                read = torch.where(fresh[:, None, :, None], read_fresh, read)
                restart = fresh[:, -1]  # (B,) the block ends in a new document: restart the state
                c = torch.where(restart[None, :, None], self.initial(b), c)
                heads = tuple(torch.where(restart[:, None, None, None], f, h)
                              for f, h in zip(fresh_heads, heads, strict=True))
                last_doc = d == d[:, -1:]  # (B, W): the states read only the block's last document
            o_cross.append(read)
            sq, sqc, sk, sv = heads
            s_self = F.scaled_dot_product_attention(sq, sk, sv, scale=1.0)  # (B, H, S, D)
            if doc is None:
                s_cross = F.scaled_dot_product_attention(sqc, k[:, :, blk], v[:, :, blk], scale=1.0)
            else:  # (FlexAttention on CUDA: megaret.ops.attention_backend)
                s_cross = key_masked_attention(sqc, k[:, :, blk], v[:, :, blk], last_doc, scale=1.0)
            c = self.state_gate(c, a.merge(torch.cat([s_self, s_cross], dim=-1)))  # (S, B, d)
            if not self.state_skip:
                c = self._state_mlp(c)
        o = torch.cat([o_self, torch.cat(o_cross, dim=2)], dim=-1)  # (B, H, T, 2D), per head
        y, _ = a.out_proj(a.merge(o))  # (T, B, d)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, BRTLayerState(c.transpose(0, 1), new_cache)
