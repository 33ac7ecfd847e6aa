"""Saving and resuming a Trainer: DeepSpeed model + ZeRO shards, counters, data position, RNG.

`Checkpointer.save()` (all ranks) writes ``run.dir/checkpoints/step_NNNNNNN`` atomically: the
files go into ``.tmp-step_NNNNNNN``; after a barrier rank 0 hashes and fsyncs them, writes
``manifest.json`` and renames the directory into place, then updates ``latest`` and prunes
(checkpoint.keep_last newest + every multiple of checkpoint.keep_every). A save that fails
leaves every published checkpoint untouched.

`Checkpointer.resume()` (all ranks) loads the newest checkpoint whose manifest verifies (rank 0
checks the sha256 of every file and tells the others); each rejected one is reported naming the
bad file. DeepSpeed reads its files through `megaret.checkpoint.safe_load` (weights_only).
Resume is bit-exact: the same losses and weights as a run that never stopped.
A checkpoint of another parallel layout (DP, TP, PP sizes; ZeRO-1/2) is resharded at resume
(megaret.train.reshard): same trajectory up to float reassociation, the same Adam moments.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megaret.checkpoint import files
from megaret.checkpoint.files import CheckpointError
from megaret.checkpoint.safe import install_safe_loading, safe_load

log = logging.getLogger("megaret.checkpoint")
DS_TAG = "ds"  # DeepSpeed writes its files into <checkpoint>/ds/

# carried recurrent states may be these dataclasses (rebuilt on load; no other type is)
_STATE_TYPES = {
    "RetNetState": "megaret.models.retnet",
    "TransformerState": "megaret.models.transformer",
    "BRTLayerState": "megaret.models.brt_layer",
    "KVCache": "megaret.models.attention_layer",
}


def pack_state(obj: Any) -> Any:
    """A carried state -> tensors and plain containers (loadable with weights_only=True)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name not in _STATE_TYPES:
            raise TypeError(f"cannot checkpoint a carried state of type {name}; "
                            f"known: {sorted(_STATE_TYPES)}")
        return {"__state_type__": name,
                "fields": {f.name: pack_state(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {k: pack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack_state(v) for v in obj)
    if obj is None or isinstance(obj, (torch.Tensor, int, float, bool, str)):
        return obj.detach().cpu().clone() if isinstance(obj, torch.Tensor) else obj
    raise TypeError(f"cannot checkpoint a carried state holding {type(obj).__name__}")


def unpack_state(obj: Any, device: torch.device | None = None) -> Any:
    if isinstance(obj, dict):
        if "__state_type__" in obj:
            cls = getattr(importlib.import_module(_STATE_TYPES[obj["__state_type__"]]), obj["__state_type__"])
            return cls(**{k: unpack_state(v, device) for k, v in obj["fields"].items()})
        return {k: unpack_state(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack_state(v, device) for v in obj)
    if isinstance(obj, torch.Tensor) and device is not None:
        return obj.to(device)
    return obj


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import random as mrandom

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "megatron": mrandom.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    mrandom.get_cuda_rng_tracker().set_states(state["megatron"])


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class Checkpointer:
    """Checkpoints of one Trainer under ``run.dir/checkpoints``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.root = Path(trainer.cfg.run.dir) / "checkpoints"
        self.last_saved_step: int | None = None
        self.messages: list[str] = []  # what resume() reported (rejected checkpoints, the one used)
        install_safe_loading(trainer.engine)

    # -- what is saved -----------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        t = self.trainer
        ctx = t.ctx
        from megaret.train.engine import MegatronMPU

        params: dict[str, list] = {}  # DeepSpeed's module key -> [full-model name, TP partition dim]
        for v, chunk in enumerate(t.chunks):
            own = dict(chunk.named_parameters())
            for name in chunk.state_dict(keep_vars=True):  # parameters and megatron's _extra_state
                p = own.get(name)
                dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
                params[f"chunks.{v}.{name}"] = [chunk.global_name(name), dim]
        return {"rank": ctx.rank, "mp_rank": MegatronMPU().get_model_parallel_rank(), "tp_rank": ctx.tp.rank,
                "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank, "params": params}

    def _loader(self) -> Any:
        return getattr(self.trainer.batches, "loader", None)

    def _carry_get(self) -> Any:
        """The recurrent state stateful training carries into the next step (None if there is none)."""
        t = self.trainer
        carry = getattr(t, "carry", None)
        return carry.state if carry is not None else getattr(t, "carried_state", None)

    def _carry_set(self, state: Any) -> None:
        t = self.trainer
        carry = getattr(t, "carry", None)
        if carry is not None:
            carry.state = state
        elif state is not None or hasattr(t, "carried_state"):
            t.carried_state = state

    def _rank_state(self) -> dict[str, Any]:
        t = self.trainer
        loader = self._loader()
        return {
            "step": t.step,
            "rng": rng_state(),
            "loader": loader.state_dict() if loader is not None else None,
            "carried_state": pack_state(self._carry_get()),
        }

    def _counters(self) -> dict[str, int]:
        t = self.trainer
        c = t.cfg
        return {"step": t.step, "tokens_seen": t.step * c.train.global_batch_size * c.data.seq_length,
                "skipped_steps": t.skipped_steps, "consecutive_skips": t.consecutive_skips}

    # -- save --------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write the checkpoint of the current step (every rank calls this); returns its directory."""
        t = self.trainer
        ctx = t.ctx
        name = files.step_name(t.step)
        box = [f".tmp-{name}-{os.getpid()}-{time.time_ns()}"]  # unique: never another save's files
        dist.broadcast_object_list(box, src=0)
        final, tmp = self.root / name, self.root / box[0]
        if ctx.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        dist.barrier()
        t.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        torch.save(self._rank_state(), tmp / _rank_file(ctx.rank))
        layouts: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(layouts, self._layout())
        dist.barrier()  # every rank's files are complete
        if ctx.rank == 0:
            manifest = {
                "format": files.FORMAT_VERSION,
                "trainer": self._counters(),
                "layout": {
                    "world_size": ctx.world_size, "tensor": ctx.tp.size, "pipeline": ctx.pp_size,
                    "virtual_pipeline": ctx.virtual_pipeline, "data": ctx.dp_size,
                    "zero_stage": t.cfg.parallel.zero_stage, "precision": t.cfg.train.precision,
                    "deepspeed_dir": DS_TAG,
                    # DeepSpeed's mp_rank_XX is the TP x PP rank; the exporter needs this table
                    "mp_ranks": {f"{lay['mp_rank']:02d}": {k: lay[k] for k in ("tp_rank", "pp_rank")}
                                 for lay in layouts if lay["dp_rank"] == 0},
                    "ranks": [{k: lay[k] for k in ("rank", "mp_rank", "tp_rank", "pp_rank", "dp_rank")}
                              for lay in layouts],
                    "params": {f"{lay['mp_rank']:02d}": lay["params"]
                               for lay in layouts if lay["dp_rank"] == 0},
                },
                "data_source": t.cfg.data.source,
                "config": t.cfg.to_dict(),
            }
            files.publish(tmp, final, manifest)
            cc = t.cfg.checkpoint
            for path in files.prune(self.root, cc.keep_last, cc.keep_every, newest=t.step):
                log.info("removed old checkpoint %s", path)
        dist.barrier()
        self.last_saved_step = t.step
        return final

    # -- resume ------------------------------------------------------------------------------

    def _select(self) -> files.Selection:
        t = self.trainer
        box: list[Any] = [None]
        if t.ctx.rank == 0:
            for m in files.recover(self.root):
                log.warning(m)
            box[0] = files.select_newest_valid(self.root)
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _check_layout(self, path: Path, manifest: dict[str, Any]) -> bool:
        """True when the checkpoint's parallel layout differs from this run's and it can be
        resharded (megaret.train.reshard); raises for what cannot be resumed."""
        t = self.trainer
        ctx = t.ctx
        lay = manifest["layout"]
        if manifest.get("data_source") != t.cfg.data.source:
            raise CheckpointError(f"{path} was saved with data.source={manifest.get('data_source')}, "
                                  f"this run has data.source={t.cfg.data.source}")
        here = {"world_size": ctx.world_size, "tensor": ctx.tp.size, "pipeline": ctx.pp_size,
                "virtual_pipeline": ctx.virtual_pipeline, "data": ctx.dp_size,
                "zero_stage": t.cfg.parallel.zero_stage}
        diff = {k: (lay.get(k), v) for k, v in here.items() if lay.get(k) != v}
        if not diff:
            return False
        from megaret.train.reshard import RESHARDABLE_ZERO

        what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
        saved = (f"tensor={lay.get('tensor')}, pipeline={lay.get('pipeline')}, "
                 f"virtual_pipeline={lay.get('virtual_pipeline')}, zero_stage={lay.get('zero_stage')}")
        if lay.get("zero_stage") not in RESHARDABLE_ZERO or here["zero_stage"] not in RESHARDABLE_ZERO:
            raise CheckpointError(f"{path} was saved with another parallel layout ({what}); resharding needs "
                                  f"ZeRO-1/2 on both sides: resume with the saved layout ({saved}) or set "
                                  "parallel.zero_stage=1 on both runs")
        if self._loader() is not None and lay.get("data") != ctx.dp_size:
            raise CheckpointError(f"{path} was saved with another parallel layout ({what}); the data-loader "
                                  f"position of data.source={t.cfg.data.source} is tied to the data-parallel "
                                  f"size: keep {lay.get('data')} data-parallel ranks (change tensor/pipeline "
                                  "with world size to match) or resume with the saved layout")
        return True

    def _reshard(self, path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Load a checkpoint of another layout (megaret.train.reshard: full fp32 weights and Adam
        moments rebuilt from the ZeRO shards, cut for this rank); returns the per-rank state to
        use: that of the saved rank with the same (dp, tp, pp) coordinates, else the same DP rank."""
        from megaret.train.reshard import consolidate_training_state, load_resharded

        t = self.trainer
        ctx = t.ctx
        names = {chunk.global_name(n) for chunk in t.chunks for n, _ in chunk.named_parameters()}
        load_resharded(t.engine, t.chunks, ctx, consolidate_training_state(path, manifest, names))
        ranks = manifest["layout"]["ranks"]
        here = (ctx.dp_rank, ctx.tp.rank, ctx.pp_rank)
        same = [r for r in ranks if (r["dp_rank"], r["tp_rank"], r["pp_rank"]) == here]
        same = same or [r for r in ranks if r["dp_rank"] == ctx.dp_rank] or ranks
        state = safe_load(path / _rank_file(min(r["rank"] for r in same)))
        if state["carried_state"] is not None:
            raise CheckpointError(f"{path} carries recurrent states across steps (data.packing=segments), "
                                  "which are laid out per rank: resume it with the saved layout")
        lay = manifest["layout"]
        msg = (f"resharded {path} from tensor={lay['tensor']} pipeline={lay['pipeline']} data={lay['data']} "
               f"to tensor={ctx.tp.size} pipeline={ctx.pp_size} data={ctx.dp_size}")
        self.messages.append(msg)
        if ctx.rank == 0:
            log.warning(msg)
        return state

    def resume(self) -> Path | None:
        """Load the newest valid checkpoint (every rank calls this); None when there is none."""
        t = self.trainer
        sel = self._select()
        self.messages = sel.messages
        if t.ctx.rank == 0:
            for m in sel.messages:
                log.warning(m)
        if sel.path is None:
            return None
        if self._check_layout(sel.path, sel.manifest):
            state = self._reshard(sel.path, sel.manifest)
        else:
            load_path, _ = t.engine.load_checkpoint(
                str(sel.path), tag=DS_TAG, load_module_strict=True, load_optimizer_states=True,
                load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {sel.path / DS_TAG}")
            state = safe_load(sel.path / _rank_file(t.ctx.rank))
        counters = sel.manifest["trainer"]
        if state["step"] != counters["step"]:
            raise CheckpointError(f"{sel.path / _rank_file(t.ctx.rank)} is from step {state['step']}, the "
                                  f"manifest says {counters['step']}")
        t.step = counters["step"]
        t.skipped_steps = counters["skipped_steps"]
        t.consecutive_skips = counters["consecutive_skips"]
        loader = self._loader()
        if loader is not None:
            if state["loader"] is None:
                raise CheckpointError(f"{sel.path} holds no data-loader position")
            loader.load_state_dict(state["loader"])
            if hasattr(t.batches, "restart"):
                t.batches.restart()
        self._carry_set(unpack_state(state["carried_state"], t.ctx.device))
        set_rng_state(state["rng"])
        self.last_saved_step = t.step
        msg = f"resumed from {sel.path} (step {t.step}, {counters['tokens_seen']} tokens seen)"
        self.messages.append(msg)
        if t.ctx.rank == 0:
            log.warning(msg)
        return sel.path
