"""Weights saved before projections were fused (megaret.models.fused), converted to the fused names.

A RetNet checkpoint saved with separate ``retention.{q,k,v,g}_proj`` weights holds, for every
layer, four full tensors (after TP merging) where the model now has one ``retention.qkvg_proj``.
Each conversion works on full-model tensors (the layout-free form: TP shards merged), so it serves
every consumer alike: the training resume (`megaret.checkpoint.model`, through the layout-free
training state of `megaret.checkpoint.reshard`: fp32 masters and both Adam moments are regrouped,
as they are element-wise), offline consolidation and export (`megaret.checkpoint.consolidate`) and
consolidated weight files (`megaret.infer.loading.load_weights`). The arch spec names the fused
weights (`ArchSpec.fused_weights`), so nothing here knows an arch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from megaret.checkpoint.reshard import FullState
from megaret.models.fused import FusedRows

SUFFIXES = (".weight", "._extra_state")  # a linear's tensor and megatron's extra state


def _prefixes(names: Iterable[str], f: FusedRows) -> list[str]:
    """The module prefixes (``layers.3.``) under which `names` hold `f`'s first separate part."""
    tail = f.parts[0] + ".weight"
    return sorted({n[: -len(tail)] for n in names
                   if n.endswith(tail) and (n == tail or n[-len(tail) - 1] == ".")})


def holds_separate(names: Iterable[str], fused: Sequence[FusedRows]) -> bool:
    """Whether full-model `names` hold separate projections that the model now fuses."""
    names = list(names)
    return any(_prefixes(names, f) for f in fused)


def separate_names(names: Iterable[str], fused: Sequence[FusedRows]) -> set[str]:
    """`names` (the fused model's) with each fused weight's name replaced by its parts' names."""
    out = set()
    for n in names:
        for f in fused:
            tail = f.fused + ".weight"
            if n.endswith(tail):
                out |= {n[: -len(tail)] + p + ".weight" for p in f.parts}
                break
        else:
            out.add(n)
    return out


def fuse_named(named: dict[str, Any], fused: Sequence[FusedRows]) -> dict[str, Any]:
    """A full-model {name: tensor} with every group of separate parts replaced by its fused tensor
    (rows grouped head by head); a dict without separate parts comes back as it is."""
    out = dict(named)
    for f in fused:
        for prefix in _prefixes(named, f):
            keys = [prefix + p + ".weight" for p in f.parts]
            if missing := [k for k in keys if k not in out]:
                raise KeyError(f"{missing[0]} (the separate projections of {prefix}{f.fused} are incomplete)")
            out[prefix + f.fused + ".weight"] = f.group([out.pop(k) for k in keys])
            extras = [prefix + p + SUFFIXES[1] for p in f.parts]
            if extras[0] in out:  # megatron's _extra_state (None): one for the fused linear
                out[prefix + f.fused + SUFFIXES[1]] = [out.pop(k, None) for k in extras][0]
    return out


def fuse_state(state: FullState, fused: Sequence[FusedRows]) -> FullState:
    """A layout-free training state with its fp32 masters and Adam moments fused (the moments are
    element-wise, so their rows are regrouped exactly as the weights')."""
    kinds: dict[str, dict[str, Any]] = {}
    for name, moments in state.moments.items():
        for kind, t in moments.items():
            kinds.setdefault(kind, {})[name] = t
    moments: dict[str, dict[str, Any]] = {}
    for kind, named in kinds.items():
        for name, t in fuse_named(named, fused).items():
            moments.setdefault(name, {})[kind] = t
    return replace(state, params=fuse_named(state.params, fused), moments=moments)


def split_named(named: dict[str, Any], fused: Sequence[FusedRows]) -> dict[str, Any]:
    """The inverse of `fuse_named` (the HF export's separate projections)."""
    out = {}
    for name, value in named.items():
        for f in fused:
            weight, extra = f.fused + SUFFIXES[0], f.fused + SUFFIXES[1]
            if name.endswith(weight):
                prefix = name[: -len(weight)]
                split = zip(f.parts, f.split(value), strict=True)
                out.update({prefix + p + SUFFIXES[0]: t for p, t in split})
                break
            if name.endswith(extra):  # megatron's extra state: one per separate linear
                out.update({name[: -len(extra)] + p + SUFFIXES[1]: value for p in f.parts})
                break
        else:
            out[name] = value
    return out
