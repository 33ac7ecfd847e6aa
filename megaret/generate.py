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
line (tokens, tokens/s) goes to stderr (third-party log chatter is dropped, its errors go to
stderr), and a warning line when the tokenizer is not the one
the checkpoint was trained with (its identity record's sha256). Arguments out of range, and a
causal Transformer's KV cache for prompt + --max-new-tokens beyond the free memory, are refused
in one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megaret.data import Tokenizer
from megaret.entry import run_entry
from megaret.infer.decoding import check_sampling, generate
from megaret.infer.loading import (
    InferenceError,
    add_model_args,
    load_model,
    resolve_tokenizer,
    tokenizer_warning,
)
from megaret.parallel.context import destroy_parallel_context
from megaret.train.chatter import quiet_third_party


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
    args = parser.parse_intermixed_args(argv)  # overrides before and after flags
    with quiet_third_party():  # stdout is the text alone (DeepSpeed warns there at import)
        return run_entry(lambda: _generate(args), destroy_parallel_context)


def _generate(args: argparse.Namespace) -> list[int]:
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)  # before loading
    cfg, model, ctx, manifest = load_model(args.config, args.weights, args.checkpoint, args.overrides)
    tok = resolve_tokenizer(cfg, args.tokenizer)
    if (warning := tokenizer_warning(manifest, tok, args.tokenizer)) is not None:
        print(warning, file=sys.stderr, flush=True)
    if tok.vocab_size > cfg.model.vocab_size:
        raise InferenceError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size="
                             f"{cfg.model.vocab_size}: use the model's tokenizer (--tokenizer)")
    ids = tok.encode(args.prompt) or [tok.bos_id]
    sys.stdout.write(tok.decode(ids))
    stream = TextStream(tok)
    t0 = time.perf_counter()
    out = generate(
        model, torch.tensor([ids], device=ctx.device), args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed, stream=stream,
        vocab_size=tok.vocab_size,
        cuda_graph=ctx.tp.size == 1,  # one-GPU RetNet steps replay a CUDA graph (NCCL capture not tried)
    )  # fmt: skip
    stream.flush()
    dt = time.perf_counter() - t0
    n = out.shape[1] - len(ids)
    sys.stdout.write("\n")
    rate = n / max(dt, 1e-9)
    print(f"[{n} tokens in {dt:.2f}s, {rate:.1f} tokens/s, arch={cfg.model.arch}]", file=sys.stderr)
    return out[0].tolist()

if __name__ == "__main__":
    main()
