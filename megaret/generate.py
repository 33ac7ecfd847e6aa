"""Generate text from a model, streaming tokens as they are chosen.

    python -m megaret.generate --config configs/tiny.yaml --weights model.pt --prompt "def main(" \\
        [--max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95 --greedy --seed 0] [key=value ...]
    python -m megaret.generate --checkpoint runs/tiny --prompt "def main(" [...]

--weights is a consolidated `torch.save(model.state_dict())` file (TP=1 layout); without it
the model keeps its random initialisation (useful only for smoke tests). --checkpoint is a
training checkpoint (a step directory, a checkpoints/ or a run directory: its newest valid
checkpoint), consolidated in memory like `megaret.export`; the config then comes from the
checkpoint's manifest (laid out for one process), so --config is not needed (key=value
overrides still apply). The tokenizer is
--tokenizer, else data.tokenizer, else the tokenizer.json saved with the configured shards
(the embedded default corpus's, built on first use). The text goes to stdout; a summary
line (tokens, tokens/s) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from megaret.checkpoint.files import CheckpointError
from megaret.config import ConfigError, load_config
from megaret.data import Tokenizer, load_manifest, resolve_manifests
from megaret.infer.generate import generate
from megaret.models.factory import build_model
from megaret.parallel.context import build_parallel_context, destroy_parallel_context
from megaret.parallel.megatron_config import megatron_config


def resolve_tokenizer(cfg, explicit: str | None) -> Tokenizer:
    """--tokenizer, data.tokenizer, or the tokenizer saved beside the first shard manifest."""
    if explicit or cfg.data.tokenizer:
        return Tokenizer(explicit or cfg.data.tokenizer)
    manifest, loc = load_manifest(resolve_manifests(cfg)[0])
    return Tokenizer(Path(loc).parent / manifest["tokenizer"]["file"])


def load_weights(model: torch.nn.Module, path: str | dict, what: str = "--weights") -> None:
    """A consolidated state dict (TP=1 layout; a file, loaded without unpickling code, or in memory)."""
    state = torch.load(path, map_location="cpu", weights_only=True) if isinstance(path, str | Path) else path
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        where = f"{what} {path}" if isinstance(path, str | Path) else what
        raise SystemExit(f"{where} does not fit model.arch={model.cfg.arch}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--config / --weights / --checkpoint and the trailing key=value overrides."""
    parser.add_argument("--config", help="a YAML under configs/ (optional with --checkpoint)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--weights", help="consolidated torch.save(model.state_dict()) file")
    src.add_argument("--checkpoint", help="a training checkpoint: step, checkpoints/ or run directory")


def load_model(args: argparse.Namespace, prog: str):
    """(cfg, model, ctx) from --config/--weights or --checkpoint (+ overrides), one process."""
    from megaret.checkpoint.consolidate import load_checkpoint

    state = None
    try:
        if args.checkpoint:
            if args.config:  # an explicit config wins over the manifest's
                state, _, _ = load_checkpoint(args.checkpoint)
                cfg = load_config(args.config, args.overrides)
            else:
                state, cfg, _ = load_checkpoint(args.checkpoint, args.overrides)
        elif args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            raise SystemExit(f"{prog}: give --config (with --weights or not) or --checkpoint")
    except (CheckpointError, ConfigError) as exc:
        raise SystemExit(f"{prog}: {exc}") from None
    if cfg.parallel.tensor != 1 or cfg.parallel.pipeline != 1:
        raise SystemExit(f"{prog} runs one process: set parallel.tensor=1 parallel.pipeline=1")
    ctx = build_parallel_context(1, 1, seed=cfg.train.seed)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).to(ctx.device)
    if state is not None:
        load_weights(model, state, f"--checkpoint {args.checkpoint}")
    elif args.weights:
        load_weights(model, args.weights)
    return cfg, model, ctx


class TextStream:
    """Prints the text of the ids generated so far, holding back an incomplete UTF-8 tail."""

    def __init__(self, tok: Tokenizer, out=sys.stdout) -> None:
        self.tok, self.out = tok, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--tokenizer", help="tokenizer.json (default: data.tokenizer or the shards')")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    args = parser.parse_args(argv)
    cfg, model, ctx = load_model(args, "megaret.generate")
    tok = resolve_tokenizer(cfg, args.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        destroy_parallel_context()
        raise SystemExit(f"tokenizer has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}")
    ids = tok.encode(args.prompt) or [tok.bos_id]
    sys.stdout.write(tok.decode(ids))
    stream = TextStream(tok)
    t0 = time.perf_counter()
    out = generate(
        model, torch.tensor([ids], device=ctx.device), args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed, stream=stream,
        vocab_size=tok.vocab_size,
    )  # fmt: skip
    stream.flush()
    dt = time.perf_counter() - t0
    n = out.shape[1] - len(ids)
    sys.stdout.write("\n")
    rate = n / max(dt, 1e-9)
    print(f"[{n} tokens in {dt:.2f}s, {rate:.1f} tokens/s, arch={cfg.model.arch}]", file=sys.stderr)
    destroy_parallel_context()
    return out[0].tolist()


if __name__ == "__main__":
    main()
