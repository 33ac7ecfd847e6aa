"""Writing an export directory: `--format hf` (a Hugging Face model) or `--format safetensors`.

hf: model.safetensors (fp32, HF names), config.json, generation_config.json, the tokenizer
(tokenizer.json, tokenizer_config.json) and, for classes transformers does not ship
(`megaret.hf.convert`), the standalone modeling code (configuration_megaret.py,
modeling_megaret.py); then

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    AutoTokenizer.from_pretrained(OUT)

safetensors: model.safetensors (fp32, megaret's names, no megatron _extra_state entries: any
process loads it with `safetensors.torch.load_file`, no torch.distributed), config.yaml (the
resolved config laid out for one process: `megaret.generate --config OUT --weights
OUT/model.safetensors --tokenizer OUT/tokenizer.json`) and tokenizer.json.

Both add export.json: step, tokens seen, arch, parameters and which weights were written.
A directory is written beside OUT and renamed into place, so OUT is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from megaret.config import Config
from megaret.config.loader import save_config
from megaret.data import Tokenizer
from megaret.export import ExportError
from megaret.hf.convert import REMOTE_FILES, HFModel, to_hf

MODELING_DIR = Path(__file__).resolve().parent / "modeling"
FORMATS = ("hf", "safetensors")
WEIGHTS_FILE = "model.safetensors"


def check_out_dir(out: Path) -> None:
    """OUT must be a new or empty directory (checked before consolidating)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: the hf and safetensors formats write a directory; "
                             f"give a new directory, e.g. {out.with_suffix('')}")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} is a directory that is not empty: give a new directory or "
                             "remove it")


def write_hf(out: Path, state: dict[str, Any], cfg: Config, tok: Tokenizer) -> HFModel:
    """Write the hf format of a consolidated state dict into the (new) directory `out`."""
    from safetensors.torch import save_file

    hf = to_hf(state, cfg.model, bos_id=tok.bos_id, eos_id=tok.eos_id, max_positions=cfg.data.seq_length)
    save_file(hf.tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if hf.remote_code:
        for name in REMOTE_FILES:
            shutil.copyfile(MODELING_DIR / name, out / name)
    hf.config.save_pretrained(out)
    _generation_config(tok, hf.config.vocab_size).save_pretrained(out)
    _hf_tokenizer(tok, cfg.data.seq_length).save_pretrained(out)
    return hf


def _generation_config(tok: Tokenizer, model_vocab: int) -> Any:
    """Stop at <eos>; ids past the tokenizer's (a vocabulary padded for the model) are never
    chosen, as megaret.generate never samples them."""
    from transformers import GenerationConfig

    padded = list(range(tok.vocab_size, model_vocab))
    extra = {"suppress_tokens": padded} if padded else {}
    return GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
                            **extra)


def _hf_tokenizer(tok: Tokenizer, max_length: int) -> Any:
    """The run's tokenizer.json as a transformers fast tokenizer with its <bos>/<eos> named (padding
    with <eos>)."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer.from_file(str(tok.path))
    named = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.eos_id}
    specials = {name: raw.id_to_token(i) for name, i in named.items() if i is not None}
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=max_length, **specials)


def write_safetensors(out: Path, state: dict[str, Any], cfg: Config, tok: Tokenizer) -> None:
    """Write the safetensors format of a consolidated state dict into the (new) directory `out`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    save_config(cfg, out)
    shutil.copyfile(tok.path, out / "tokenizer.json")


def export_dir(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str,
               tokenizer: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write `fmt` ("hf" or "safetensors") of a checkpoint (a step, checkpoints/ or run directory)
    into the new directory `out`; returns it and what export.json holds. Raises ExportError,
    CheckpointError, ConfigError or DataError (the tokenizer)."""
    from megaret.checkpoint.consolidate import export_weights, weights_source
    from megaret.infer.loading import resolve_tokenizer, tokenizer_warning

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown; use pt, {' or '.join(FORMATS)}")
    out = Path(out)
    check_out_dir(out)
    state, manifest, cfg = export_weights(checkpoint)
    tok = resolve_tokenizer(cfg, tokenizer)
    meta: dict[str, Any] = {
        "format": fmt, "step": manifest["trainer"]["step"], "tokens_seen": manifest["trainer"]["tokens_seen"],
        "arch": cfg.model.arch, "parameters": sum(t.numel() for t in state.values() if torch.is_tensor(t)),
        "weights": weights_source(manifest), "tokenizer_sha256": tok.sha256}
    if (warning := tokenizer_warning(manifest, tok, tokenizer)) is not None:
        meta["tokenizer_warning"] = warning
    if tok.vocab_size > cfg.model.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size="
                             f"{cfg.model.vocab_size}: give the run's tokenizer with --tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "hf":
            hf = write_hf(tmp, state, cfg, tok)
            meta.update(hf_class=hf.architecture, remote_code=hf.remote_code)
        else:
            write_safetensors(tmp, state, cfg, tok)
        (tmp / "export.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:  # a full disk or Ctrl-C leaves no temporary directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, meta
