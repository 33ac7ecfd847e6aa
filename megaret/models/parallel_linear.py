"""Thin constructors for megatron-core's tensor-parallel linears.

Blocks call `column(...)` / `row(...)` and then just `self.proj(x)`: which process group
and which initialisation are decided here, once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig

from megaret.parallel.context import TensorParallel


def column(
    in_features: int,
    out_features: int,
    config: TransformerConfig,
    tp: TensorParallel,
    init_method: Callable[[torch.Tensor], None] | None = None,
) -> ColumnParallelLinear:
    """y_local = x W_local: the output features are split across TP ranks (no gather)."""
    return ColumnParallelLinear(
        in_features,
        out_features,
        config=config,
        init_method=init_method or config.init_method,
        bias=False,
        gather_output=False,
        tp_group=tp.group,
    )


def row(
    in_features: int,
    out_features: int,
    config: TransformerConfig,
    tp: TensorParallel,
) -> RowParallelLinear:
    """y = sum over TP ranks of x_local W_local: the input features are split (all-reduce)."""
    return RowParallelLinear(
        in_features,
        out_features,
        config=config,
        init_method=config.output_layer_init_method,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=tp.group,
    )
