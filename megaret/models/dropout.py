"""Dropout on the residual stream, and the rule for which random stream draws its mask.

The rule (megatron's, with the data-parallel offset stated):

- Weights are initialised from `train.seed` alone, before any offset, so every DP rank and
  every PP layout starts from the same model as one process would.
- After the model is built, `seed_dropout_streams` (megaret/parallel/context.py) reseeds this
  rank's streams with `train.seed + 100 * (dp_rank * pp_size + pp_rank)`: megatron's
  `seed + 100 * pp_rank`, with one slot more per DP rank. The default generator gets that seed
  (the same on the TP peers of one DP rank and stage), megatron's RNG tracker its
  tensor-parallel stream `that seed + 2718 + tp_rank` (`seed_tensor_parallel_rng`). Megatron
  leaves DP ranks on one seed and relies on their different data for different masks; we give
  each DP rank its own streams, so its masks differ even where two ranks see equal samples.
- Without sequence parallelism the residual activations are replicated over the TP group: every
  TP peer computes the same residual, so its mask must be the same, else the replicas drift
  apart. `ResidualDropout` draws from the default generator (the same on TP peers).
- Under sequence parallelism each TP rank holds its own slice of the sequence, so the mask is
  drawn inside the tracker's fork (the per-TP-rank stream), as megatron's TransformerBlock does
  with `sequence_parallel`: the shards draw different masks.
- All of these streams are saved per rank by the checkpoint's RNG part and restored on resume,
  so a resumed run draws the masks the uninterrupted run would have drawn. Activation
  recomputation (megatron's checkpoint) saves and restores them around the replay.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualDropout(nn.Dropout):
    """nn.Dropout whose mask comes from the per-TP-rank stream when the activations are
    sequence-parallel shards (see the module docstring for the rule)."""

    def __init__(self, p: float, sequence_parallel: bool = False) -> None:
        super().__init__(p)
        self.sequence_parallel = bool(sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.sequence_parallel and self.training and self.p > 0):
            return super().forward(x)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sequence_parallel={self.sequence_parallel}"

