"""What a checkpoint was trained on and as: its identity record, and the check at resume.

Every checkpoint's manifest carries an ``identity``::

    {"model.arch": "retnet", "model.hidden_size": 2048, ...,   # the arch spec's identity_fields
     "tokenizer": "<sha256 of the tokenizer the ids come from>" | None (synthetic data),
     "data": {"source": "shards", "manifests": [{"location": ..., "sha256": ...}, ...]}}

The data manifests' sha256 is that of their content (canonical JSON), so a manifest read from
another copy or URL is the same data. Resuming a run.dir with another model, tokenizer or data
is refused (`IdentityError`, one line naming each change old -> new and the fix); the parallel
layout, train.steps, the LR schedule, intervals and logging are not part of the identity.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from megaret.checkpoint.files import CheckpointError
from megaret.models.spec import arch_spec

MODEL_PREFIX = "model."


class IdentityError(CheckpointError):
    """The run asks to resume a checkpoint of another model, tokenizer or data."""


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of a shard manifest's content (canonical JSON: the same wherever it is read from)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_identity(cfg: Any) -> dict[str, Any]:
    """The identity record of the run `cfg` describes (reads the data manifests, not the shards)."""
    spec = arch_spec(cfg.model.arch)
    ident: dict[str, Any] = {"model.arch": cfg.model.arch, **spec.model_identity(cfg.model)}
    if cfg.data.source == "synthetic":
        ident["tokenizer"] = None
        ident["data"] = {"source": "synthetic"}
        return ident
    from megaret.data import load_manifest, resolve_manifests

    manifests = []
    tokenizer = None
    for location in resolve_manifests(cfg):
        manifest, loc = load_manifest(location)
        manifests.append({"location": str(loc), "sha256": manifest_sha256(manifest)})
        tokenizer = tokenizer or manifest.get("tokenizer", {}).get("sha256")
    ident["tokenizer"] = tokenizer
    ident["data"] = {"source": "shards", "manifests": manifests}
    return ident


def _short(sha: str | None) -> str:
    return "none" if sha is None else f"sha256 {sha[:12]}"


def _data_text(data: dict[str, Any] | None) -> str:
    if not data:
        return "unknown"
    if data.get("source") != "shards":
        return f"data.source={data.get('source')}"
    return ", ".join(f"{m['location']} ({_short(m['sha256'])})" for m in data.get("manifests", [])) or "none"


def _shas(data: dict[str, Any]) -> list[str]:
    return sorted(m["sha256"] for m in data.get("manifests", []))


def changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[str]]:
    """{"model" | "tokenizer" | "data": ["what: old -> new", ...]} of what differs (empty: the same)."""
    out: dict[str, list[str]] = {}
    keys = [k for k in {**saved, **now} if k.startswith(MODEL_PREFIX)]
    model = [f"{k} {saved.get(k, 'unset')!r} -> {now.get(k, 'unset')!r}"
             for k in keys if saved.get(k) != now.get(k)]
    if saved.get("model.arch") != now.get("model.arch"):  # another arch: its fields say nothing more
        model = [f"model.arch {saved.get('model.arch')!r} -> {now.get('model.arch')!r}"]
    if model:
        out["model"] = model
    if saved.get("tokenizer") != now.get("tokenizer"):
        out["tokenizer"] = [f"tokenizer {_short(saved.get('tokenizer'))} -> {_short(now.get('tokenizer'))}"]
    old, new = saved.get("data") or {}, now.get("data") or {}
    if old.get("source") != new.get("source") or _shas(old) != _shas(new):
        out["data"] = [f"data {_data_text(old)} -> {_data_text(new)}"]
    return out


def what_changed(diff: dict[str, list[str]]) -> str:
    """"other data and another tokenizer" for a `changes` result."""
    words = {"model": "another model", "tokenizer": "another tokenizer", "data": "other data"}
    parts = [words[k] for k in ("data", "tokenizer", "model") if k in diff]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def check_resume(ckpt: Any, saved: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """Raise IdentityError when resuming checkpoint `ckpt` (identity `saved`) with `now` would train
    another model or on other data; returns a warning for a checkpoint without a record."""
    if saved is None:
        return (f"{ckpt} has no identity record (written by an older megaret): resuming it without checking "
                "that the data, tokenizer and model are the ones it was trained with")
    diff = changes(saved, now)
    if not diff:
        return None
    run_dir = ckpt.parent.parent
    details = "; ".join(line for lines in diff.values() for line in lines)
    raise IdentityError(
        f"cannot resume {ckpt} with {what_changed(diff)} ({details}): to resume it, set those back (the "
        f"run's config is {run_dir / 'config.yaml'}); to train its weights on with this setup, start a new "
        f"run.dir with checkpoint.load={run_dir} checkpoint.load_mode=weights (or weights+optimizer, all)")


def check_load(ckpt: Any, saved: dict[str, Any] | None, now: dict[str, Any], mode: str) -> list[str]:
    """checkpoint.load of `ckpt`: the model must be the same (the weights must fit) -> IdentityError;
    another tokenizer or data is what loading is for: returned as warnings."""
    if saved is None:
        return [f"checkpoint.load={ckpt} has no identity record (an older megaret): its model, tokenizer and "
                "data are not checked"]
    diff = changes(saved, now)
    if "model" in diff:
        raise IdentityError(
            f"checkpoint.load={ckpt} holds another model than this run builds ({'; '.join(diff['model'])}): "
            f"checkpoint.load_mode={mode} loads its weights into the same model only; set those model.* "
            f"values as the checkpoint has them (its config is in {ckpt}/manifest.json)")
    notes = []
    if "tokenizer" in diff:
        notes.append(f"checkpoint.load={ckpt} was trained with another tokenizer ({diff['tokenizer'][0]}): "
                     "its embeddings belong to the other token ids")
    if "data" in diff and mode == "all":
        notes.append(f"checkpoint.load={ckpt} was trained on other data ({diff['data'][0]}): "
                     "checkpoint.load_mode=all keeps its data position, which belongs to that data")
    return notes
