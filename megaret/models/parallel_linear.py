"""Thin constructors for megatron-core's tensor-parallel linears.

Blocks call `column(...)` / `row(...)` and then just `self.proj(x)`: which process group
and which initialisation are decided here, once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig

from megaret.models.fused import FusedRows
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


def fused_column(
    in_features: int,
    rows: FusedRows,
    config: TransformerConfig,
    tp: TensorParallel,
) -> ColumnParallelLinear:
    """Several column-parallel projections of the same input as one GEMM: the output features are
    `rows`' parts grouped head by head, so each TP rank's shard holds its own heads of every part
    (megaret.models.fused). Initialised to exactly the weights the separate `column`s would get."""
    if rows.heads % tp.size:
        raise ValueError(f"{rows.heads} heads are not divisible by parallel.tensor={tp.size}")
    if not config.use_cpu_initialization:  # megatron's GPU path draws per rank: other numbers
        raise ValueError("fused_column draws the full weight: it needs use_cpu_initialization=True")
    return column(in_features, rows.rows, config, tp, init_method=rows.init_method(config.init_method))


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
