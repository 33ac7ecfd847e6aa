"""The model and optimizer part: the DeepSpeed engine's own checkpoint files.

``engine.save_checkpoint`` writes ``<checkpoint>/ds/`` (``mp_rank_XX_model_states.pt`` per TP x PP
rank, ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` per DP x MP rank); the part's state, kept in
the manifest under "model", is the layout that describes those files: the parallel sizes, ZeRO
stage and precision, which (tp_rank, pp_rank) each ``mp_rank_XX`` is, and for each of its stored
names the full-model name and TP partition dim (what offline consolidation and resharding need).
DeepSpeed reads its files through `megaret.checkpoint.safe.safe_load` (weights_only). A
checkpoint of another layout is resharded (`megaret.checkpoint.reshard`); so is one saved with
separate projections the model now fuses, converted on the way (`megaret.checkpoint.upgrade`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from megaret.checkpoint.files import CheckpointError
from megaret.checkpoint.merge import tp_dim
from megaret.checkpoint.parts import Part
from megaret.checkpoint.reshard import holds_partitions, load_resharded, training_state
from megaret.checkpoint.safe import install_safe_loading
from megaret.checkpoint.upgrade import fuse_state, holds_separate, separate_names
from megaret.models.fused import FusedRows

DS_TAG = "ds"  # DeepSpeed writes its files into <checkpoint>/ds/


def check_layout(path: Path, saved: dict[str, Any], here: dict[str, Any], precision: str = "fp32") -> bool:
    """True when the saved layout differs from this run's (`here`: parallel sizes and ZeRO stage;
    `precision`: this run's train.precision) and can be resharded; raises for a change resharding
    cannot do."""
    diff = {k: (saved.get(k), v) for k, v in here.items() if saved.get(k) != v}
    if not diff:
        return False
    what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
    old = (f"tensor={saved.get('tensor')}, pipeline={saved.get('pipeline')}, "
           f"virtual_pipeline={saved.get('virtual_pipeline')}, zero_stage={saved.get('zero_stage')}")
    if not (holds_partitions(saved.get("zero_stage"), saved.get("precision"))
            and holds_partitions(here["zero_stage"], precision)):
        raise CheckpointError(f"{path} was saved with another parallel layout ({what}); resharding needs "
                              f"ZeRO-1/2 (bf16: ZeRO-0 too) on both sides: resume with the saved layout "
                              f"({old}) or set parallel.zero_stage=1 on both runs")
    return True


class ModelOptimizer(Part):
    """This rank's virtual stages and the DeepSpeed ZeRO engine that holds their optimizer."""

    shared = True

    def __init__(self, engine: Any, stages: list[Any], ctx: Any, zero_stage: int, precision: str,
                 fused: tuple[FusedRows, ...] = ()) -> None:
        self.engine, self.stages, self.ctx = engine, stages, ctx
        self.zero_stage, self.precision = zero_stage, precision
        self.fused = fused  # the model's fused projections (its arch spec's fused_weights)
        # what load() takes: "all" (weights, optimizer state, DeepSpeed's counters: a resume),
        # "weights+optimizer" (the counters start at 0) or "weights" (fresh optimizer state)
        self.load_mode = "all"
        install_safe_loading(engine)

    def here(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"world_size": ctx.world_size, "tensor": ctx.tp.size, "pipeline": ctx.pp_size,
                "virtual_pipeline": ctx.virtual_pipeline,
                # ZeRO's data-parallel size: DP x CP (CP shards no weights, only the sequence)
                "data": ctx.dp_cp_size, "zero_stage": self.zero_stage}

    def _stored_names(self) -> dict[str, list]:
        """DeepSpeed's module key -> [full-model name, TP partition dim] of this rank's tensors."""
        params: dict[str, list] = {}
        for v, stage in enumerate(self.stages):
            own = dict(stage.named_parameters())
            for name in stage.state_dict(keep_vars=True):  # parameters and megatron's _extra_state
                p = own.get(name)
                params[f"chunks.{v}.{name}"] = [stage.global_name(name), None if p is None else tp_dim(p)]
        return params

    def save(self, directory: Path) -> dict[str, Any]:
        failed = None
        try:
            self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk while writing this rank's files
            # a write that fails skips DeepSpeed's closing barrier: take it here, so the peers (which
            # wait in it) and this rank meet again and the manager can stop them all together
            failed = exc
            dist.barrier()
        ctx = self.ctx
        # mp_rank: the TP x PP rank DeepSpeed names this rank's files by
        mine = {"mp_rank": self.engine.checkpoint_mp_rank, "tp_rank": ctx.tp.rank,
                "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
                "params": self._stored_names() if ctx.dp_rank == 0 else None}
        every: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(every, mine)
        if failed is not None:
            raise failed
        first = [r for r in every if r["dp_rank"] == 0]  # one copy of each TP x PP rank's files
        return {
            **self.here(), "precision": self.precision, "deepspeed_dir": DS_TAG,
            "mp_ranks": {f"{r['mp_rank']:02d}": {k: r[k] for k in ("tp_rank", "pp_rank")} for r in first},
            "params": {f"{r['mp_rank']:02d}": r["params"] for r in first},
        }

    def load(self, directory: Path, layout: dict[str, Any] | None) -> str | None:
        if layout is None:
            raise CheckpointError(f"{directory} holds no model layout")
        saved = [name for per_mp in layout["params"].values() for name, _ in per_mp.values()]
        if holds_separate(saved, self.fused):
            return self._convert(directory, layout)
        if check_layout(directory, layout, self.here(), self.precision):
            return self._reshard(directory, layout)
        weights_only = self.load_mode == "weights"
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag=layout["deepspeed_dir"], load_module_strict=True,
            load_optimizer_states=not weights_only, load_lr_scheduler_states=False,
            load_module_only=weights_only)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {directory / layout['deepspeed_dir']}")
        self._start_counters()
        return None

    def _start_counters(self) -> None:
        """A run started from another's weights counts its own steps from 0."""
        if self.load_mode != "all":
            for name in ("global_steps", "global_samples", "skipped_steps"):
                if hasattr(self.engine, name):
                    setattr(self.engine, name, 0)

    def _convert(self, directory: Path, layout: dict[str, Any]) -> str:
        """A checkpoint saved with separate projections the model now fuses: through the layout-free
        training state (fp32 masters and Adam moments regrouped), on any layout it could reshard to."""
        if not holds_partitions(layout.get("zero_stage"), layout.get("precision")):
            raise CheckpointError(
                f"{directory} holds separate retention q/k/v/g projections (saved before they were fused "
                f"into qkvg_proj) at parallel.zero_stage={layout.get('zero_stage')} "
                f"({layout.get('precision')}), whose optimizer files cannot be converted: resume it with "
                "the megaret that saved it (its weights still convert: python -m megaret.export)")
        moved = check_layout(directory, layout, self.here(), self.precision)  # refuses what cannot reshard
        message = self._reshard(directory, layout, separate=True)
        what = message if moved else f"converted {directory}"
        return f"{what}: its separate q/k/v/g projections fused into qkvg_proj"

    def _reshard(self, directory: Path, layout: dict[str, Any], separate: bool = False) -> str:
        """Full fp32 weights and Adam moments rebuilt from the saved ZeRO shards, cut for this rank;
        `separate`: the checkpoint holds the separate projections of this model's fused weights."""
        ctx = self.ctx
        names = {stage.global_name(n) for stage in self.stages for n, _ in stage.named_parameters()}
        if separate:
            saved = training_state(directory, layout, separate_names(names, self.fused))
            state = fuse_state(saved, self.fused)
        else:
            state = training_state(directory, layout, names)
        if self.load_mode == "weights":  # the fp32 masters only: fresh Adam moments and step
            state.moments, state.step = {}, None
        if self.load_mode != "all":
            state.engine_counters = {}
        load_resharded(self.engine, self.stages, ctx, state)
        self._start_counters()
        return (f"resharded {directory} from tensor={layout['tensor']} pipeline={layout['pipeline']} "
                f"data={layout['data']} to tensor={ctx.tp.size} pipeline={ctx.pp_size} data={ctx.dp_cp_size}")
