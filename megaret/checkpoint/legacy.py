"""Checkpoints of format 1 (written before the stateful-parts manager), read as format 2.

Format 1::

    manifest.json   {"format": 1, "trainer": counters, "layout": {parallel sizes, zero_stage,
                     precision, deepspeed_dir, mp_ranks, params, ranks}, "data_source", "config"}
    rank_NNNNN.pt   {"step", "rng", "loader", "carried_state" (pack_state form)}

Format 2 (`megaret.checkpoint.manager`)::

    manifest.json   {"format": 2, "step", "ranks", one entry per shared part ("trainer",
                     "schedule", "model": what was "layout" less "ranks"), "config"}
    rank_NNNNN.pt   {"format": 2, "step", "parts": {per-rank part: state} ("data", "carry", "rng")}

DeepSpeed's files under ``ds/`` are the same in both. A format-1 checkpoint loads with the
Trainer's parts unchanged: these functions give its manifest and rank files format 2's shape.
"""

from __future__ import annotations

from typing import Any

from megaret.checkpoint.parts import carry_layout, schedule_settings

RANK_KEYS = ("rank", "tp_rank", "pp_rank", "dp_rank")


def format_of(manifest: dict[str, Any]) -> int:
    return manifest.get("format", 1)


def model_layout(manifest: dict[str, Any]) -> dict[str, Any]:
    """The model part's entry: the layout of DeepSpeed's files (any format)."""
    return manifest["model"] if format_of(manifest) >= 2 else manifest["layout"]


def upgrade_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest in format 2's shape (a format-2 one as it is)."""
    if format_of(manifest) >= 2:
        return manifest
    lay = manifest["layout"]
    out = {"format": 1, "step": manifest["trainer"]["step"],
           "ranks": [{k: r[k] for k in RANK_KEYS} for r in lay["ranks"]],
           "trainer": manifest["trainer"], "model": {k: v for k, v in lay.items() if k != "ranks"}}
    config = manifest.get("config")
    if config:
        out["schedule"] = schedule_settings(config["optimizer"], config["train"]["steps"])
        out["config"] = config
    return out


def upgrade_rank_state(state: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """A rank file's content in format 2's shape; `manifest` as read (not upgraded)."""
    if format_of(manifest) >= 2:
        return state
    lay = manifest["layout"]
    carried = state["carried_state"]  # None: the run carried no state (data.packing=packed)
    layout = carry_layout(lay["tensor"], lay["pipeline"], lay["virtual_pipeline"], lay["data"])
    return {"format": 1, "step": state["step"], "parts": {
        "data": {"source": manifest.get("data_source"), "data_parallel": lay["data"],
                 "loader": state["loader"]},
        "carry": None if carried is None else {"layout": layout, "states": unpack_carried(carried)},
        "rng": state["rng"],
    }}


def unpack_carried(obj: Any) -> Any:
    """A carried state as format-1 checkpoints packed it (nested {"__state_type__": name,
    "fields": {...}} dicts) -> the plain state_dict form the protocol reads (names dropped:
    each state type recognises its own fields)."""
    if isinstance(obj, dict):
        if "__state_type__" in obj:
            return {k: unpack_carried(v) for k, v in obj["fields"].items()}
        return {k: unpack_carried(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [unpack_carried(v) for v in obj]
    return obj
