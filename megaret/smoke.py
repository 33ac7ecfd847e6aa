"""Forward/backward smoke run: build the configured RetNet and train it briefly on a toy task.

    python -m megaret.smoke --config configs/tiny.yaml [section.key=value ...]

The task is a fixed random bigram map (the next token is a function of the current one),
so a working model's loss falls quickly from log(vocab). The training issue replaces this
with the full trainer on the embedded corpus.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from megaret.config import load_config, save_config
from megaret.models.retnet import RetNet
from megaret.parallel.context import build_parallel_context, destroy_parallel_context
from megaret.parallel.megatron_config import megatron_config


def bigram_batch(vocab: int, batch: int, seq: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token walk through a fixed random permutation: the next token is next_of[current]."""
    next_of = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    start = torch.randint(vocab, (batch,), generator=gen)
    seqs = [start]
    for _ in range(seq):
        seqs.append(next_of[seqs[-1]])
    tokens = torch.stack(seqs, dim=1)  # (B, T + 1)
    return tokens[:, :-1], tokens[:, 1:]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a YAML under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ctx = build_parallel_context(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.train.seed)
    if cfg.parallel.pipeline != 1:
        raise SystemExit("the smoke run is single-stage; set parallel.pipeline=1")
    if ctx.rank == 0:
        print(f"resolved config written to {save_config(cfg, cfg.run.dir)}")
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                            weight_decay=cfg.optimizer.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    if ctx.rank == 0:
        print(f"RetNet: {n_params:,} parameters on this rank, TP={ctx.tp.size}, "
              f"mode={cfg.model.retention_mode}, device={ctx.device}; loss starts near "
              f"log(vocab)={math.log(cfg.model.vocab_size):.2f}")
    loss_value = float("nan")
    t0 = time.time()
    for step in range(1, cfg.train.steps + 1):
        tokens, labels = bigram_batch(
            cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_length, gen
        )
        out = model(tokens.to(ctx.device), labels.to(ctx.device))
        loss = out.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
        opt.step()
        loss_value = loss.item()
        if ctx.rank == 0 and (step % cfg.train.log_interval == 0 or step in (1, cfg.train.steps)):
            print(f"step {step:4d}  loss {loss_value:.4f}  ({time.time() - t0:.1f}s)", flush=True)
    destroy_parallel_context()
    return loss_value


if __name__ == "__main__":
    main()
