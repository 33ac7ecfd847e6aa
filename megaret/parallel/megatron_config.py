"""Translate megaret's typed config into the megatron-core config its layers expect."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import init_method_normal, scaled_init_method_normal

from megaret.config import ModelConfig, ParallelConfig


def megatron_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
) -> TransformerConfig:
    """Build the TransformerConfig megatron-core's parallel layers and schedules read.

    Weights are always initialised on the CPU from a full master tensor, then sliced: the
    same seed gives the same model whatever the tensor-parallel size (and keeps the
    `tensor_model_parallel` attribute gradient clipping relies on).
    """
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method=init_method_normal(model.init_std),
        output_layer_init_method=scaled_init_method_normal(model.init_std, model.num_layers),
        gradient_accumulation_fusion=False,
        hidden_dropout=model.dropout,
        attention_dropout=0.0,
        batch_p2p_comm=False,  # batched p2p on gloo gives silently wrong grads at PP=2
    )
