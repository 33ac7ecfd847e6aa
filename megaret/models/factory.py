"""One entry point that builds the model a config names, so the trainer treats archs alike."""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.parallel.context import TensorParallel


def build_model(cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel, **stage) -> nn.Module:
    """model.arch -> RetNet | Transformer (causal or sliding) | BlockRecurrentTransformer.

    Every model takes (tokens, labels=None, state=None, ...) and returns an output with
    `.logits` (B, T, V / tp), `.loss` (B, T) or None and `.state` (with `.detach()`).
    stage: pre_process / post_process / layers (global indices) build one pipeline stage, whose
    parts are initialised exactly like the same parts of the full model.
    """
    if cfg.arch == "retnet":
        from megaret.models.retnet import RetNet

        return RetNet(cfg, config, tp, **stage)
    if cfg.arch in ("transformer", "sliding"):
        from megaret.models.transformer import Transformer

        return Transformer(cfg, config, tp, **stage)
    if cfg.arch == "brt":
        from megaret.models.brt import BlockRecurrentTransformer

        return BlockRecurrentTransformer(cfg, config, tp, **stage)
    raise ValueError(f"model.arch: unknown {cfg.arch!r}; use retnet, transformer, sliding or brt")
