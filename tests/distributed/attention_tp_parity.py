"""Launched by tests/test_attention_tp_parity.py on 4 CPU ranks: the Transformer, the
sliding-window Transformer and the BRT (both gates, with and without the state MLP) at TP=2
and TP=4 equal TP=1.

For each TP size the same seed builds the same full model (megatron's CPU initialisation
slices one master weight; replicated parameters come from the same default generator), runs
two segments (the second continuing from the first's state, so caches and recurrent state are
exercised) forward and backward, and the full-vocabulary logits and every parameter gradient
(TP shards gathered along their partition dim) are compared with TP=1. Rank 0 prints one line
`RESULT {json}`.

Every registered arch (megaret/models/spec.py) is also built from its spec at TP=2, run forward
and backward over two segments, and its carried state round-tripped through the state protocol
(state_dict, a weights-only file, from_state_dict): continuing from the loaded state equals
continuing from the original; every dropout module of every arch is a ResidualDropout.

The dropout rule (megaret/models/dropout.py) on TP=2 x DP=2: the masks of a RetNet's dropout
modules (forward hooks) with and without sequence parallelism, gathered from the four ranks, and
the next masks after the checkpoint's RNG part is saved and restored.
"""

from __future__ import annotations

import io
import sys

import torch
import torch.distributed as dist
from _common import print_result, rel  # tests/distributed/_common.py (the script's own folder)

from megaret.checkpoint.gather import gather_full
from megaret.checkpoint.parts import RNG
from megaret.config import load_config
from megaret.models.dropout import ResidualDropout
from megaret.models.spec import SPECS, build_model
from megaret.parallel.context import build_parallel_context, destroy_parallel_context, seed_dropout_streams
from megaret.parallel.megatron_config import megatron_config

VARIANTS = {
    "transformer": ("configs/transformer-tiny.yaml", []),
    "sliding": ("configs/sliding-tiny.yaml", ["model.ffn_type=swiglu"]),
    "brt-fixed-skip": ("configs/brt-tiny.yaml", []),
    "brt-lstm-mlp": ("configs/brt-tiny.yaml", ["model.gate_type=lstm", "model.state_skip=false",
                                                "model.ffn_type=swiglu"]),
}
REPLICATED_2D = ("state_ids", "initial_state")  # (S, d) per-state tables, the same on every rank


def run(tp: int, path: str, extra: list[str]):
    overrides = [f"parallel.tensor={tp}", "model.num_heads=4", "model.vocab_size=128", "data.seq_length=32",
                 *extra]
    cfg = load_config(path, overrides)
    ctx = build_parallel_context(tp, 1, seed=cfg.train.seed)
    torch.manual_seed(11)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp)
    missing = [n for n, p in model.named_parameters()
               if p.dim() == 2 and not getattr(p, "tensor_model_parallel", False)
               and not n.endswith(REPLICATED_2D)]
    assert not missing, f"weights without the tensor_model_parallel attribute: {missing}"
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(128, (2, 64), generator=gen)
    y = torch.randint(128, (2, 64), generator=gen)
    first = model(x[:, :32], y[:, :32])
    second = model(x[:, 32:], y[:, 32:], state=first.state, restart=torch.tensor([False, True]))
    w = torch.rand(2, 64, generator=gen)
    (torch.cat([first.loss, second.loss], dim=1) * w).sum().backward()
    logits = torch.cat([model.gather_logits(o.logits).detach() for o in (first, second)], dim=1)
    return logits, gather_full([model], ctx, lambda p: p.grad)


SPEC_CONFIGS = {"retnet": "configs/tiny.yaml", "transformer": "configs/transformer-tiny.yaml",
                "sliding": "configs/sliding-tiny.yaml", "brt": "configs/brt-tiny.yaml"}


def round_trip(state, spec):
    """A carried state through the protocol and a weights-only file, as a checkpoint holds it."""
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    return spec.state_class.from_state_dict(torch.load(buf, weights_only=True))


def check_spec(arch: str, tp: int) -> dict:
    """Build `arch` from its registered spec at `tp`, run two segments forward and backward, and
    resume the second from the first's state saved and loaded through the state protocol."""
    overrides = [f"parallel.tensor={tp}", "model.num_heads=4", "model.vocab_size=128", "data.seq_length=32"]
    cfg = load_config(SPEC_CONFIGS[arch], overrides)
    spec = SPECS[arch]
    ctx = build_parallel_context(tp, 1, seed=cfg.train.seed)
    torch.manual_seed(11)
    model = spec.build(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(128, (2, 64), generator=gen)
    y = torch.randint(128, (2, 64), generator=gen)
    first = model(x[:, :32], y[:, :32])
    second = model(x[:, 32:], y[:, 32:], state=first.state)
    (first.loss.sum() + second.loss.sum()).backward()
    with torch.no_grad():
        uninterrupted = model(x[:, 32:], state=first.state)
        resumed = model(x[:, 32:], state=round_trip(first.state, spec))
        restarted = model(x[:, 32:], state=first.state.reset(torch.tensor([True, True])))
        fresh = model(x[:, 32:])
    grads = [p.grad for p in model.parameters()]
    logits = torch.cat([model.gather_logits(o.logits).detach() for o in (first, second)], dim=1)
    return {
        "state_type_ok": isinstance(first.state, spec.state_class),
        "state_batch": first.state.batch_size, "state_bytes": first.state.nbytes,
        "resumed_equal": torch.equal(resumed.logits, uninterrupted.logits),
        # a reset of every sample equals a fresh start except for the shared position offset
        # (rotary angles are relative: equal up to rounding)
        "reset_rel": rel(restarted.logits, fresh.logits),
        "dropout_ok": all(isinstance(m, ResidualDropout) for m in model.modules()
                          if isinstance(m, torch.nn.Dropout)),
        "grads_finite": all(g is not None and bool(g.isfinite().all()) for g in grads),
        "grads_nonzero": sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads) / len(grads),
        "logits": logits,
    }


def dropout_masks(sp: bool) -> list[dict]:
    """On TP=2 (x DP=2 over 4 ranks): the masks a RetNet with dropout 0.5 draws in one training
    forward, the next forward's, and the next forward's again after the RNG part is restored;
    what every rank drew, gathered."""
    overrides = ["parallel.tensor=2", f"parallel.sequence_parallel={str(sp).lower()}", "model.dropout=0.5",
                 "model.vocab_size=128", "data.seq_length=32"]
    cfg = load_config("configs/tiny.yaml", overrides)
    ctx = build_parallel_context(2, 1, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp)
    seed_dropout_streams(cfg.train.seed, ctx)
    drops = [m for m in model.modules() if isinstance(m, ResidualDropout)]
    assert drops and all(m.sequence_parallel == sp for m in drops), drops
    masks: list[torch.Tensor] = []
    for m in drops:
        m.register_forward_hook(lambda mod, inp, out: masks.append((out != 0).flatten()))
    x = torch.randint(128, (2, 32), generator=torch.Generator().manual_seed(5))  # the same on every rank

    def forward() -> torch.Tensor:
        masks.clear()
        model(x, x)
        return torch.cat(masks)

    first = forward()
    saved = RNG().state_dict()  # a checkpoint's RNG part between two steps
    second = forward()
    RNG().load_state_dict(saved)  # a resume from it
    resumed = forward()
    got = [None] * ctx.world_size
    dist.all_gather_object(got, {"tp_rank": ctx.tp.rank, "dp_rank": ctx.dp_rank, "first": first,
                                 "second": second, "resumed": resumed})
    return got


def check_dropout() -> dict:
    """Which ranks drew equal masks, per layout (rank 0 compares what the four ranks drew)."""
    out = {}
    for sp in (False, True):
        got = dropout_masks(sp)
        by = {(g["tp_rank"], g["dp_rank"]): g for g in got}
        assert set(by) == {(t, d) for t in (0, 1) for d in (0, 1)}, sorted(by)
        out["sequence_parallel" if sp else "replicated"] = {
            "tp_peers_equal": [torch.equal(by[0, d]["first"], by[1, d]["first"]) for d in (0, 1)],
            "dp_ranks_equal": [torch.equal(by[t, 0]["first"], by[t, 1]["first"]) for t in (0, 1)],
            "next_step_equal": any(torch.equal(g["first"], g["second"]) for g in got),
            "resumed_equal": all(torch.equal(g["resumed"], g["second"]) for g in got),
            "kept": sum(g["first"].float().mean().item() for g in got) / len(got),
        }
    return out


def main() -> None:
    dropout = check_dropout()
    specs = {}
    for arch in SPECS:
        ref = check_spec(arch, 1)
        got = check_spec(arch, 2)
        specs[arch] = {**{k: v for k, v in got.items() if k != "logits"},
                       "logits_rel_tp1": rel(got["logits"], ref["logits"])}
    results = {}
    for name, (path, extra) in VARIANTS.items():
        ref_logits, ref_grads = run(1, path, extra)
        for tp in (2, 4):
            logits, grads = run(tp, path, extra)
            assert grads.keys() == ref_grads.keys()
            worst = max(ref_grads, key=lambda n: rel(grads[n], ref_grads[n]))
            results[f"{name}/tp{tp}"] = {
                "logits_rel": rel(logits, ref_logits),
                "grad_rel_max": rel(grads[worst], ref_grads[worst]),
                "worst_param": worst,
                "num_params": len(ref_grads),
            }
    print_result({"parity": results, "specs": specs, "dropout": dropout})
    destroy_parallel_context()


if __name__ == "__main__":
    sys.exit(main())
