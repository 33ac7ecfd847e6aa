"""A consolidated megaret state dict as a Hugging Face model: which class, its config, its tensors.

The Transformer baseline is exported as a class transformers ships where one computes the same
function, so it loads without remote code:

- LayerNorm + GELU (the default baseline): GPT-NeoX, sequential residual (use_parallel_residual
  false), no attention bias, full rotary; its MLP has biases, exported as zeros;
- RMSNorm + SwiGLU: Llama (no attention or MLP bias, one key/value head per query head).

Both rotate the pairs (i, i + D/2) (halves), where megaret rotates interleaved pairs (2i, 2i + 1):
the rows of each head's query and key projections are permuted on export (q . k is unchanged
by a permutation applied to both). Every other configuration (RetNet, the windowed archs,
BRT, the other norm / FFN pairs) is exported for the standalone remote code in
megaret/hf/modeling/ (`MegaretForCausalLM`), whose parameters keep megaret's names, except that
weights megaret fuses into one GEMM (RetNet's qkvg_proj) are split into their projections there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megaret.checkpoint.upgrade import split_named
from megaret.config.schema import ModelConfig
from megaret.models.spec import arch_spec

REMOTE_FILES = ("configuration_megaret.py", "modeling_megaret.py")
AUTO_MAP = {"AutoConfig": "configuration_megaret.MegaretConfig",
            "AutoModelForCausalLM": "modeling_megaret.MegaretForCausalLM"}


@dataclass
class HFModel:
    """What an exported directory holds: the class it loads as and whether it needs the remote
    code, its config (a transformers config object) and its tensors (HF names)."""

    architecture: str
    remote_code: bool
    config: Any
    tensors: dict[str, torch.Tensor]


def native_class(m: ModelConfig) -> str | None:
    """The transformers class that computes model.* exactly, or None (remote code): the arch spec's."""
    return arch_spec(m.arch).hf_native_class(m)


def halves_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A q or k projection (H*D, d) with each head's output rows reordered from interleaved
    rotary pairs (0, 1), (2, 3), ... to halves: rows 0, 2, 4, ..., then 1, 3, 5, ..."""
    out, d = weight.shape
    w = weight.view(num_heads, out // num_heads // 2, 2, d)  # (H, D/2, pair, d)
    return w.transpose(1, 2).reshape(out, d).contiguous()


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a consolidated state dict (megatron's _extra_state entries dropped), fp32."""
    return {k: v.detach().float().contiguous() for k, v in state.items() if torch.is_tensor(v)}


def to_hf(state: dict[str, Any], m: ModelConfig, *, bos_id: int | None, eos_id: int | None,
          max_positions: int) -> HFModel:
    """The HF model of a consolidated megaret state dict with model config `m`."""
    weights = _tensors(state)
    common = {"vocab_size": weights["embedding.weight"].shape[0], "hidden_size": m.hidden_size,
              "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
              "intermediate_size": m.ffn_hidden_size, "max_position_embeddings": max_positions,
              "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "pad_token_id": eos_id}
    kind = native_class(m)
    if kind == "GPTNeoXForCausalLM":
        return HFModel(kind, False, _neox_config(m, common), _neox_tensors(weights, m))
    if kind == "LlamaForCausalLM":
        return HFModel(kind, False, _llama_config(m, common), _llama_tensors(weights, m))
    from megaret.hf.modeling.configuration_megaret import MegaretConfig

    config = MegaretConfig(
        arch=m.arch, ffn_type=m.ffn_type, norm_type=m.norm_type, norm_eps=m.norm_eps,
        rotary_base=m.rotary_base, value_factor=m.value_factor, decay_schedule=m.decay_schedule,
        chunk_size=m.chunk_size, block_size=m.block_size, num_states=m.num_states,
        recurrent_layers=m.recurrent_layer_indices, gate_type=m.gate_type, state_skip=m.state_skip,
        initializer_range=m.init_std, architectures=["MegaretForCausalLM"], auto_map=AUTO_MAP, **common)
    separate = split_named(weights, arch_spec(m.arch).fused_weights(m))  # the remote code's q/k/v/g_proj
    return HFModel("MegaretForCausalLM", True, config, separate)


# ---------------------------------------------------------------------------------------------
# GPT-NeoX


def _neox_config(m: ModelConfig, common: dict[str, Any]) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        hidden_act="gelu", layer_norm_eps=m.norm_eps, use_parallel_residual=False, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base, "partial_rotary_factor": 1.0},
        hidden_dropout=0.0, attention_dropout=0.0, initializer_range=m.init_std,
        architectures=["GPTNeoXForCausalLM"], **common)


def _neox_tensors(w: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    h, d = m.num_heads, m.hidden_size
    out = {"gpt_neox.embed_in.weight": w["embedding.weight"],
           "gpt_neox.final_layer_norm.weight": w["final_norm.weight"],
           "gpt_neox.final_layer_norm.bias": w["final_norm.bias"]}
    if not m.tie_embeddings:
        out["embed_out.weight"] = w["output.weight"]
    for i in range(m.num_layers):
        src, dst = f"layers.{i}.", f"gpt_neox.layers.{i}."
        q = halves_rows(w[src + "attention.q_proj.weight"], h).view(h, -1, d)  # (H, D, d)
        k = halves_rows(w[src + "attention.k_proj.weight"], h).view(h, -1, d)
        v = w[src + "attention.v_proj.weight"].view(h, -1, d)
        out.update({
            # GPT-NeoX's fused projection holds each head's [q; k; v] rows together
            dst + "attention.query_key_value.weight": torch.cat([q, k, v], dim=1).reshape(3 * d, d),
            dst + "attention.dense.weight": w[src + "attention.out_proj.weight"],
            dst + "input_layernorm.weight": w[src + "attention_norm.weight"],
            dst + "input_layernorm.bias": w[src + "attention_norm.bias"],
            dst + "post_attention_layernorm.weight": w[src + "ffn_norm.weight"],
            dst + "post_attention_layernorm.bias": w[src + "ffn_norm.bias"],
            dst + "mlp.dense_h_to_4h.weight": w[src + "ffn.up.weight"],
            dst + "mlp.dense_h_to_4h.bias": torch.zeros(m.ffn_hidden_size),
            dst + "mlp.dense_4h_to_h.weight": w[src + "ffn.down.weight"],
            dst + "mlp.dense_4h_to_h.bias": torch.zeros(d),
        })
    return out


# ---------------------------------------------------------------------------------------------
# Llama


def _llama_config(m: ModelConfig, common: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_act="silu", rms_norm_eps=m.norm_eps, attention_bias=False, mlp_bias=False,
        num_key_value_heads=m.num_heads, head_dim=m.hidden_size // m.num_heads,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base}, attention_dropout=0.0,
        initializer_range=m.init_std, architectures=["LlamaForCausalLM"], **common)


def _llama_tensors(w: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    h = m.num_heads
    out = {"model.embed_tokens.weight": w["embedding.weight"], "model.norm.weight": w["final_norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = w["output.weight"]
    for i in range(m.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out.update({
            dst + "self_attn.q_proj.weight": halves_rows(w[src + "attention.q_proj.weight"], h),
            dst + "self_attn.k_proj.weight": halves_rows(w[src + "attention.k_proj.weight"], h),
            dst + "self_attn.v_proj.weight": w[src + "attention.v_proj.weight"],
            dst + "self_attn.o_proj.weight": w[src + "attention.out_proj.weight"],
            dst + "input_layernorm.weight": w[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": w[src + "ffn_norm.weight"],
            dst + "mlp.gate_proj.weight": w[src + "ffn.gate.weight"],
            dst + "mlp.up_proj.weight": w[src + "ffn.up.weight"],
            dst + "mlp.down_proj.weight": w[src + "ffn.down.weight"],
        })
    return out
