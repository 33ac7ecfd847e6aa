"""What the launched parity scripts share: relative differences and run comparisons."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def norm_rel(a: dict, b: dict) -> float:
    """Global relative difference ||a - b|| / ||b|| over all tensors of two name -> tensor maps."""
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    return (num / sum(b[k].double().pow(2).sum() for k in b)).sqrt().item()


def compare(losses: list[float], params: dict, ref_losses: list[float], ref_params: dict) -> dict:
    """Step losses and final parameters of a run against the reference run's."""
    assert params.keys() == ref_params.keys(), sorted(set(params) ^ set(ref_params))
    return {
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_rel_norm": norm_rel(params, ref_params),
        "param_rel_max": max(rel(params[k], ref_params[k]) for k in ref_params),  # worst tensor, max-abs
    }
