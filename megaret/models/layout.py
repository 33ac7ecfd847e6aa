"""Which layers a pipeline stage holds: one function for the models and the launch planner."""

from __future__ import annotations


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0
                 ) -> tuple[list[int], bool, bool]:
    """(global layer indices, pre_process, post_process) of one virtual pipeline stage
    (megatron's "model chunk").

    Megatron's interleaved layout: virtual stage s = vp_rank * pp_size + pp_rank holds the
    s-th contiguous slice of num_layers / (pp_size * vp_size) layers.
    """
    stages = pp_size * vp_size
    if num_layers % stages:
        raise ValueError(f"model.num_layers={num_layers} is not divisible by pipeline*virtual={stages}")
    per = num_layers // stages
    s = vp_rank * pp_size + pp_rank
    return list(range(s * per, (s + 1) * per)), s == 0, s == stages - 1


def rank_layers(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1) -> list[int]:
    """Every layer one pipeline rank holds: its virtual stages' layers, in order."""
    return [i for vp_rank in range(vp_size)
            for i in stage_layers(num_layers, pp_size, pp_rank, vp_size, vp_rank)[0]]
