"""RetNet's q/k/v/g projections as one column-parallel GEMM (megaret/models/fused.py; issue 13 item 4).

One process: the fused weight is initialised to exactly the weights the four separate projections
of the same seed get (built old-style here, beside it); each TP rank's shard holds its own heads'
q, k, v, g rows; a state dict with the separate projections converts to the fused one and back;
an fp32 ZeRO-0 checkpoint with separate projections is refused in one line. The 2- and 4-rank TP
parity (tests/test_tp_parity.py) and the format-1 fixture's resume to the old code's losses
(tests/test_checkpoint_formats.py) run the fused layer end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaret.checkpoint.files import CheckpointError
from megaret.checkpoint.upgrade import fuse_named, holds_separate, separate_names, split_named
from megaret.config import load_config
from megaret.models.fused import qkvg_rows
from megaret.models.parallel_linear import column, row
from megaret.models.retention_layer import MultiScaleRetention
from megaret.models.spec import arch_spec, build_model
from megaret.parallel.megatron_config import megatron_config

CFG = load_config("configs/tiny.yaml", ["model.num_heads=4", "model.hidden_size=64", "model.value_factor=2"])


def _config(dtype: torch.dtype):
    return megatron_config(CFG.model, CFG.parallel, dtype, bf16=dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_weight_is_initialised_as_the_four_separate_projections(ctx1, dtype):
    m, config = CFG.model, _config(dtype)
    d, v = m.hidden_size, m.value_factor * m.hidden_size
    torch.manual_seed(7)  # the old layer: four column-parallel projections, then the output
    old = [column(d, d, config, ctx1.tp), column(d, d, config, ctx1.tp), column(d, v, config, ctx1.tp),
           column(d, v, config, ctx1.tp), row(v, d, config, ctx1.tp)]
    torch.manual_seed(7)
    new = MultiScaleRetention(d, m.num_heads, m.value_factor, config, ctx1.tp, chunk_size=16)
    fused = new.qkvg_proj.weight
    assert fused.dtype == dtype and fused.shape == (2 * d + 2 * v, d)
    parts = qkvg_rows(d, m.num_heads, m.value_factor).split(fused.detach())
    for got, want in zip(parts, old[:4], strict=True):
        assert torch.equal(got, want.weight)  # same seed, same weights
    assert torch.equal(new.out_proj.weight, old[4].weight)  # and the draws after it are unchanged
    assert not torch.equal(parts[0], parts[1])


def test_each_tp_rank_shard_holds_its_own_heads_q_k_v_g():
    """megatron cuts the full fused weight into TP contiguous pieces: rank r's piece must be exactly
    the fused weight of heads [r H / tp, (r + 1) H / tp) of each of q, k, v, g."""
    heads, d, vf = 8, 32, 2
    rows = qkvg_rows(d, heads, vf)
    parts = [torch.randn(heads * r, d) for r in rows.head_rows]
    full = rows.group(parts)
    assert [torch.equal(a, b) for a, b in zip(rows.split(full), parts, strict=True)] == [True] * 4
    for tp in (2, 4, 8):
        local = qkvg_rows(d, heads // tp, vf)  # a rank's heads (the same Dk, Dv per head)
        local = type(local)(local.fused, local.parts, rows.head_rows, heads // tp)
        for r in range(tp):
            want = local.group([p.chunk(tp)[r] for p in parts])
            assert torch.equal(full.chunk(tp)[r], want), (tp, r)
    # the order matters: grouping by projection instead (all q, then all k, ...) is another layout
    assert not torch.equal(full, torch.cat(parts))


def test_a_state_dict_with_separate_projections_converts_to_the_fused_model_and_back(ctx1):
    m = CFG.model
    torch.manual_seed(3)
    model = build_model(m, _config(torch.float32), ctx1.tp)
    fused = arch_spec(m.arch).fused_weights(m)
    new = model.state_dict()
    old = split_named(new, fused)  # the names and tensors the model had before the fusion
    assert "layers.1.retention.g_proj.weight" in old and "layers.1.retention.qkvg_proj.weight" not in old
    assert holds_separate(old, fused) and not holds_separate(new, fused)
    assert "layers.0.retention.q_proj._extra_state" in old  # megatron's, one per linear
    back = fuse_named(old, fused)
    assert back.keys() == new.keys()
    assert all(torch.equal(back[k], v) for k, v in new.items() if torch.is_tensor(v))
    names = {n for n, _ in model.named_parameters()}
    assert separate_names(names, fused) == {n for n, v in old.items() if torch.is_tensor(v)}
    # a consolidated weight file from before the fusion loads (megaret.infer.loading.load_weights)
    from megaret.infer.loading import load_weights

    torch.manual_seed(4)
    other = build_model(m, _config(torch.float32), ctx1.tp)
    load_weights(other, old)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters(), strict=True))


def test_an_fp32_zero0_checkpoint_with_separate_projections_is_refused_in_one_line():
    from megaret.checkpoint.model import ModelOptimizer

    part = ModelOptimizer.__new__(ModelOptimizer)  # its load() decides before touching the engine
    part.fused = arch_spec("retnet").fused_weights(CFG.model)
    layout = {"zero_stage": 0, "precision": "fp32", "params": {"00": {
        "chunks.0.layers.0.retention.q_proj.weight": ["layers.0.retention.q_proj.weight", 0]}}}
    with pytest.raises(CheckpointError) as err:
        part.load(Path("ckpt"), layout)
    msg = str(err.value)
    assert "\n" not in msg and "separate retention q/k/v/g projections" in msg and "megaret.export" in msg
