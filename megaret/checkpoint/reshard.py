"""Resuming a checkpoint on another parallel layout (DP, TP, PP, virtual PP): resharding.

A checkpoint saved at one layout is turned into a layout-free training state and cut again for
the layout of the resuming run. No DeepSpeed universal-checkpoint pass is needed (its TP merge
wants per-parameter patterns the model would have to declare); the manifest already holds
everything:

1. `training_state` (offline, no process group; `consolidate_training_state` from a whole
   manifest): for every saved TP x PP rank (``mp_rank_XX``, mapped to (tp_rank, pp_rank) by the
   model part's manifest entry) read the ZeRO-1/2 optimizer
   shard of each DP rank (``zero_pp_rank_D_mp_rank_XX_optim_states.pt``; a bf16 run's come from
   DeepSpeed's BF16_Optimizer, at ZeRO-0 too, named ``bf16_zero_pp_rank_...`` and holding the same
   keys: its ``fp32_groups_flat_partition`` saved as ``single_partition_of_fp32_groups``). Each holds the DP
   rank's flat partition of the fp32 master weights and of Adam's ``exp_avg``/``exp_avg_sq``,
   and ``param_slice_mappings``: for each parameter (by DeepSpeed's module key) the slice of that
   partition it occupies. Concatenating a parameter's slices in DP-rank order gives its flat TP
   shard; the model file gives the shard's shape; the manifest's {key: (full-model name, TP
   partition dim)} merges TP shards (`megaret.checkpoint.merge.merge_tp`) and PP stages by name. Result:
   {full-model name: fp32 master, exp_avg, exp_avg_sq} plus Adam's step counter. The masters
   come from the optimizer (exact under bf16 too), not from the model copies.
2. `load_resharded` (every rank of the new run): slice each full tensor for this rank's TP rank
   and stage, copy it into the module parameter, into this DP rank's fragment of the flat fp32
   partition (``_hp_mapping`` addresses) and into freshly built Adam state tensors of the base
   optimizer, then let DeepSpeed link its per-parameter optimizer fragments.

The loss trajectory then continues as on the saved layout up to float reassociation (gradient
all-reduce / accumulation order), and the gathered moments equal the saved ones bit for bit
(tests/test_reshard.py). The model part (`megaret.checkpoint.model`) decides when to reshard;
the other parts load as usual, each from the saved rank with the same coordinates (else the same
DP rank, else rank 0): a loader position is tied to the DP size, so the data part refuses a DP
change for loader-based data (data.source=synthetic is keyed by step and global sample, any DP
size sees the same batches); dropout streams are per rank (megaret/models/dropout.py) and a rank
with no saved twin takes another rank's, so exactness across layouts holds with dropout 0.
Carried recurrent states (data.packing=segments) and fp32 ZeRO-0 / ZeRO-3 are refused with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaret.checkpoint.files import CheckpointError
from megaret.checkpoint.gather import gather_full
from megaret.checkpoint.legacy import model_layout
from megaret.checkpoint.merge import merge_named, shard_of, tp_dim
from megaret.checkpoint.safe import safe_load

MOMENTS = ("exp_avg", "exp_avg_sq")
RESHARDABLE_ZERO = (1, 2)  # ZeRO stages whose files hold flat fp32 + Adam partitions per DP rank


def holds_partitions(zero_stage: int | None, precision: str | None) -> bool:
    """Whether a run's optimizer files hold flat fp32 master + Adam partitions per DP rank: ZeRO-1/2,
    and bf16 at ZeRO-0, which runs DeepSpeed's BF16_Optimizer (megaret.train.engine.deepspeed_config)."""
    return zero_stage in RESHARDABLE_ZERO or (zero_stage == 0 and precision == "bf16")


def flat_groups(zopt: Any) -> tuple[list[list[torch.nn.Parameter]], list[torch.Tensor]]:
    """(the model parameters of each param group, this DP rank's flat fp32 master partition of each)
    of a ZeRO-1/2 optimizer or DeepSpeed's BF16_Optimizer; CheckpointError for any other."""
    if hasattr(zopt, "bit16_groups") and hasattr(zopt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return zopt.bit16_groups, zopt.single_partition_of_fp32_groups
    if hasattr(zopt, "bf16_groups") and hasattr(zopt, "fp32_groups_flat_partition"):  # BF16_Optimizer
        return zopt.bf16_groups, zopt.fp32_groups_flat_partition
    raise CheckpointError(f"resharding loads into a ZeRO-1/2 optimizer (or bf16's); this run has "
                          f"{type(zopt).__name__} (zero_stage 0 or 3): use parallel.zero_stage=1")


@dataclass
class FullState:
    """The layout-free training state of a checkpoint: full-model fp32 tensors by name."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32 masters
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {exp_avg, ..}
    step: torch.Tensor | None = None  # Adam's step counter (None: the optimizer never stepped)
    engine_counters: dict[str, Any] = field(default_factory=dict)  # DeepSpeed global_steps, ...


def _group_states(base: Any, n_groups: int) -> list[dict[str, Any]]:
    """The base optimizer's per-group state of one flat partition (one param per group)."""
    if isinstance(base, dict):  # torch optimizer.state_dict(): state indexed by param position
        return [base.get("state", {}).get(i, {}) for i in range(n_groups)]
    return [dict(s) if s else {} for s in base]  # elastic_checkpoint: a list per group


def optimizer_file(ds: Path, layout: dict[str, Any], dp_rank: int, mp: str) -> Path:
    """DP rank `dp_rank`'s ZeRO shard of TP x PP rank `mp` (DeepSpeed prefixes a bf16 run's "bf16_")."""
    prefix = "bf16_" if layout.get("precision") == "bf16" else ""
    return ds / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp}_optim_states.pt"


def _optimizer_slices(ds: Path, mp: str, key_map: dict[str, list], layout: dict[str, Any]
                      ) -> tuple[dict[str, dict[str, list[torch.Tensor]]], list[torch.Tensor]]:
    """For each DeepSpeed module key of TP x PP rank `mp`: its slices of the fp32 masters and Adam
    moments in DP-rank order ({key: {kind: [slice per DP rank]}}), and the Adam step counters seen."""
    flat: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: list[torch.Tensor] = []
    for d in range(layout["data"]):
        path = optimizer_file(ds, layout, d, mp)
        osd = safe_load(path)["optimizer_state_dict"]
        fp32 = osd["single_partition_of_fp32_groups"]
        states = _group_states(osd["base_optimizer_state"], len(fp32))
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            if "step" in states[i]:
                steps.append(states[i]["step"])
            for key, frag in mapping.items():
                if key not in key_map:
                    raise CheckpointError(f"{path} holds {key}, which the manifest does not map")
                parts = flat.setdefault(key, {"param": [], **{m: [] for m in MOMENTS}})
                parts["param"].append(fp32[i].narrow(0, frag.start, frag.numel))
                for m in MOMENTS:
                    if m in states[i]:
                        parts[m].append(states[i][m].narrow(0, frag.start, frag.numel))
    return flat, steps


def _shard_kinds(ds: Path, mp: str, key: str, value: torch.Tensor,
                 slices: dict[str, list[torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """{param, exp_avg, exp_avg_sq: this TP shard as fp32, shaped like the model file's tensor}."""
    if slices is None:  # a frozen tensor: not in the optimizer
        return {"param": value.float()}
    kinds = {}
    for kind, parts in slices.items():
        if not parts:
            continue
        t = torch.cat(parts)
        if t.numel() != value.numel():
            raise CheckpointError(f"{ds}: the ZeRO shards of {key} (mp_rank {mp}) hold "
                                  f"{t.numel()} values, the model file {value.numel()}")
        kinds[kind] = t.view(value.shape).float()
    return kinds


def training_state(ckpt: Path, layout: dict[str, Any], names: set[str] | None = None) -> FullState:
    """Full fp32 weights, Adam moments and step of a (verified) checkpoint whose model part has
    `layout` (its manifest entry); only `names` if given."""
    if not holds_partitions(layout.get("zero_stage"), layout.get("precision")):
        raise CheckpointError(
            f"{ckpt} was saved with parallel.zero_stage={layout.get('zero_stage')}; resharding reads "
            f"ZeRO-1/2 (or bf16) optimizer shards only: resume it with its own layout "
            f"(tensor={layout['tensor']}, pipeline={layout['pipeline']}, data={layout['data']})")
    ds = ckpt / layout["deepspeed_dir"]
    out = FullState()
    pieces: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (full name, kind) -> tp_rank -> shard
    dims: dict[tuple[str, str], int | None] = {}
    steps: list[torch.Tensor] = []
    for mp, where in sorted(layout["mp_ranks"].items()):
        key_map = layout["params"][mp]  # DeepSpeed module key -> [full-model name, TP partition dim]
        model = safe_load(ds / f"mp_rank_{mp}_model_states.pt")
        if not out.engine_counters:
            counters = ("global_steps", "global_samples", "skipped_steps")
            out.engine_counters = {k: model.get(k) for k in counters}
        flat, mp_steps = _optimizer_slices(ds, mp, key_map, layout)
        steps += mp_steps
        for key, (name, dim) in key_map.items():
            value = model["module"].get(key)
            if not torch.is_tensor(value) or (names is not None and name not in names):
                continue  # megatron's _extra_state, or a tensor this rank does not hold
            for kind, t in _shard_kinds(ds, mp, key, value, flat.get(key)).items():
                pieces.setdefault((name, kind), {})[where["tp_rank"]] = t
                dims[(name, kind)] = dim
    for (name, kind), t in merge_named(pieces, dims, layout["tensor"], ckpt).items():
        if kind == "param":
            out.params[name] = t
        else:
            out.moments.setdefault(name, {})[kind] = t
    if steps:
        if any(float(s) != float(steps[0]) for s in steps):
            raise CheckpointError(f"{ckpt}: the optimizer shards disagree on Adam's step "
                                  f"({sorted({float(s) for s in steps})})")
        out.step = steps[0].clone()
    if names is not None and (absent := sorted(names - set(out.params))):
        raise CheckpointError(f"{ckpt} lacks {absent[:3]} (a checkpoint of another model?)")
    return out


def consolidate_training_state(ckpt: Path, manifest: dict[str, Any],
                               names: set[str] | None = None) -> FullState:
    """`training_state` of a checkpoint from its (verified) manifest, of any format."""
    return training_state(ckpt, model_layout(manifest), names)


def _local(full: torch.Tensor, p: torch.nn.Parameter, tp_size: int, tp_rank: int, name: str) -> torch.Tensor:
    """This TP rank's shard of a full tensor, shaped like parameter `p`."""
    full = shard_of(full, tp_dim(p), tp_size, tp_rank)
    if tuple(full.shape) != tuple(p.shape):
        raise CheckpointError(f"{name}: the checkpoint's tensor cuts to {tuple(full.shape)} on this rank, "
                              f"the model has {tuple(p.shape)} (another model config?)")
    return full


def load_resharded(engine: Any, stages: list[torch.nn.Module], ctx: Any, state: FullState) -> None:
    """Set this rank's parameters, ZeRO fp32 partition and Adam state from a layout-free state."""
    zopt = engine.optimizer
    lp_groups, fp32_groups = flat_groups(zopt)
    local: dict[int, dict[str, torch.Tensor]] = {}  # id(param) -> kind -> this rank's shard
    with torch.no_grad():
        for stage in stages:
            for n, p in stage.named_parameters():
                name = stage.global_name(n)
                if name not in state.params:
                    raise CheckpointError(f"the checkpoint has no {name}")
                kinds = {"param": state.params[name], **state.moments.get(name, {})}
                local[id(p)] = {k: _local(v, p, ctx.tp.size, ctx.tp.rank, name) for k, v in kinds.items()}
                p.copy_(local[id(p)]["param"].to(p.dtype))
        base = zopt.optimizer
        for i, flat in enumerate(fp32_groups):
            bufs = {m: torch.zeros_like(flat) for m in MOMENTS}
            for lp in lp_groups[i]:
                hp = getattr(lp, "_hp_mapping", None)
                if hp is None:  # no part of this parameter lies in this DP rank's partition
                    continue
                src, lpa, hpa = local[id(lp)], hp.lp_fragment_address, hp.hp_fragment_address
                for kind, dst in (("param", flat), *bufs.items()):
                    if kind in src:
                        piece = src[kind].flatten().narrow(0, lpa.start, lpa.numel)
                        dst.data.narrow(0, hpa.start, hpa.numel).copy_(piece)
            if state.step is not None:
                base.state[flat].clear()
                base.state[flat].update({"step": state.step.clone(), **bufs})
    if state.step is not None:  # point DeepSpeed's per-parameter views at the new state tensors
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()
    for k, v in state.engine_counters.items():
        if v is not None and hasattr(engine, k):
            setattr(engine, k, v)


def full_optimizer_state(engine: Any, stages: list[torch.nn.Module], ctx: Any,
                         key: str) -> dict[str, torch.Tensor]:
    """Adam's `key` (exp_avg, exp_avg_sq), or "master" (the fp32 master weight), of every parameter of
    the full model, on every rank (summed over the DP partitions, then gathered over TP and PP);
    collective.

    Read from the base optimizer's flat state through each parameter's ``_hp_mapping`` (DeepSpeed's
    own ``safe_get_full_optimizer_state`` misses the second param group: it links the optimizer
    fragments once, after the first group's step, before the second group has any state).
    """
    lp_groups, fp32_groups = flat_groups(engine.optimizer)
    group_of = {id(lp): i for i, group in enumerate(lp_groups) for lp in group}

    def value_of(p: torch.nn.Parameter) -> torch.Tensor:
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        hp = getattr(p, "_hp_mapping", None)
        if hp is not None:
            flat = fp32_groups[group_of[id(p)]]
            src = flat if key == "master" else engine.optimizer.optimizer.state[flat][key]
            lpa, hpa = hp.lp_fragment_address, hp.hp_fragment_address
            buf.narrow(0, lpa.start, lpa.numel).copy_(src.narrow(0, hpa.start, hpa.numel))
        dist.all_reduce(buf, group=ctx.dp_cp_group)  # ZeRO's group (DP x CP)
        return buf.view(p.shape)
    return gather_full(stages, ctx, value_of)
