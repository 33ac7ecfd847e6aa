"""What the launched parity scripts share: relative differences, run comparisons, the plain
torch reference training loop, packed documents as a batch source, and reporting the result."""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.distributed as dist

from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config
from megaret.train.batches import Batch, SyntheticBatches
from megaret.train.engine import _param_groups
from megaret.train.schedule import learning_rate


class PackedDocs:
    """Every sample packs documents of fixed lengths (crossing chunk boundaries); doc_start marks
    their first tokens; each document's labels are its own next tokens. Every step serves the same
    rows: all of them, or this DP rank's share once `ctx` (the trainer's parallel context) is set."""

    ANY = [(5, 14, 13), (16, 16), (1, 20, 11), (32,), (9, 7, 16), (3, 3, 26), (31, 1), (12, 12, 8)]
    BLOCK_ALIGNED = [(8, 24), (16, 16), (8, 8, 16), (32,), (24, 8), (8, 8, 8, 8), (16, 8, 8), (32,)]  # W=8

    def __init__(self, vocab: int, lengths: list[tuple[int, ...]]) -> None:
        g = torch.Generator().manual_seed(7)
        self.docs = [[torch.randint(vocab, (n + 1,), generator=g) for n in row] for row in lengths]
        self.ctx = None

    def next_batch(self, step: int) -> Batch:
        tokens = torch.stack([torch.cat([d[:-1] for d in row]) for row in self.docs])  # (rows, T)
        labels = torch.stack([torch.cat([d[1:] for d in row]) for row in self.docs])
        doc_start = torch.zeros(tokens.shape, dtype=torch.bool)
        for b, row in enumerate(self.docs):
            starts = torch.tensor([0] + [len(d) - 1 for d in row[:-1]]).cumsum(0)
            doc_start[b, starts] = True
        rows = slice(None)
        if self.ctx is not None:
            per = len(self.docs) // self.ctx.dp_size
            rows = slice(self.ctx.dp_rank * per, (self.ctx.dp_rank + 1) * per)
        return Batch(tokens[rows], labels[rows], torch.ones(tokens[rows].shape), doc_start=doc_start[rows])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def norm_rel(a: dict, b: dict) -> float:
    """Global relative difference ||a - b|| / ||b|| over all tensors of two name -> tensor maps."""
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    return (num / sum(b[k].double().pow(2).sum() for k in b)).sqrt().item()


def compare(losses: list[float], params: dict, ref_losses: list[float], ref_params: dict) -> dict:
    """Step losses and final parameters of a run against the reference run's."""
    assert params.keys() == ref_params.keys(), sorted(set(params) ^ set(ref_params))
    return {
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_rel_norm": norm_rel(params, ref_params),
        "param_rel_max": max(rel(params[k], ref_params[k]) for k in ref_params),  # worst tensor, max-abs
        "worst_param": max(ref_params, key=lambda k: rel(params[k], ref_params[k])),
    }


def full_model(cfg, tp) -> torch.nn.Module:
    """The whole model (every layer, on this rank) with the weights the trainer starts from."""
    torch.manual_seed(cfg.train.seed)
    plain = dataclasses.replace(cfg.parallel, pipeline=1, virtual_pipeline=None)
    return build_model(cfg.model, megatron_config(cfg.model, plain), tp)


def plain_torch(cfg, tp) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training written directly: full model, torch AdamW, clip_grad_norm_, no DeepSpeed."""
    model = full_model(cfg, tp)
    o = cfg.optimizer
    opt = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    data = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_length, cfg.train.global_batch_size, 1, 0,
                            cfg.train.seed)
    losses = []
    for step in range(1, cfg.train.steps + 1):
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, o, cfg.train.steps)
        x, y = data.next_batch(step)
        opt.zero_grad()
        total = 0.0
        mb = cfg.train.micro_batch_size
        n = x.shape[0] // mb
        for xm, ym in zip(x.split(mb), y.split(mb), strict=True):
            loss = model(xm, ym).loss.mean() / n
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


def print_result(report: dict) -> None:
    """Rank 0 prints one line `RESULT {json}` for the pytest side (tests/conftest.py:result)."""
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)


def report_and_close(report: dict) -> None:
    """Print the result, then leave the process group together."""
    print_result(report)
    dist.barrier()
    dist.destroy_process_group()
