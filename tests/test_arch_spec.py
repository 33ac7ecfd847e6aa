"""The arch specs (megaret/models/spec.py): FLOPs counted by the one rule equal what torch's
flop counter measures, refusals are the same in the dry run and the trainer, parameter counts
match built models, and nothing outside megaret/models branches on the arch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megaret.config import load_config
from megaret.models.spec import SPECS, arch_spec, build_model
from megaret.parallel.megatron_config import megatron_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"retnet": "configs/tiny.yaml", "transformer": "configs/transformer-tiny.yaml",
           "sliding": "configs/sliding-tiny.yaml", "brt": "configs/brt-tiny.yaml"}
# (the recurrent retention form is left out: its k^T v update is a broadcast product, which
# the flop counter does not see as a matmul)
VARIANTS = [
    ("retnet", []), ("retnet", ["model.retention_mode=parallel", "model.ffn_type=swiglu"]),
    ("transformer", []), ("sliding", []), ("brt", []),
    ("brt", ["model.state_skip=false", "model.gate_type=lstm", "model.ffn_type=swiglu"]),
]


def measured_flops(model, tokens: torch.Tensor, state) -> tuple[float, float]:
    """(FLOPs inside the tensor-parallel linear layers, all other FLOPs) of one forward, per token.
    SDPA runs its math backend (CPU flash attention has no FLOP formula in the counter)."""
    linear = {n for n, m in model.named_modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens, state=state)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    weights = sum(sum(ops.values()) for name, ops in counts.items()
                  if name.split(".", 1)[-1] in linear and "." in name)
    return weights / tokens.numel(), (total - weights) / tokens.numel()


@pytest.mark.parametrize("arch,overrides", VARIANTS)
def test_flops_per_token_equal_the_flop_counter(ctx1, arch, overrides):
    cfg = load_config(CONFIGS[arch], overrides)
    m, t = cfg.model, cfg.data.seq_length
    torch.manual_seed(0)
    model = build_model(m, megatron_config(m, cfg.parallel), ctx1.tp).eval()
    x = torch.randint(m.vocab_size, (2, t), generator=torch.Generator().manual_seed(1))
    spec = arch_spec(arch)
    # archs that carry a bounded state are counted in the steady state (a continuing segment, as
    # training and decoding run them); the causal Transformer on a fresh call (its training form)
    state = None
    if spec.carried_span(m) is not None:
        with torch.no_grad():
            state = model(x).state
    weights, mixer = measured_flops(model, x, state)
    want = spec.flops_per_token(m, t)
    assert weights == want.weights, (weights, want)  # weight matmuls exactly
    assert mixer == pytest.approx(want.mixer, rel=1e-12), (mixer, want)  # the documented formula
    assert want.training == 3 * (want.weights + want.mixer)


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_closed_form_parameter_count_equals_the_built_model(ctx1, arch):
    for overrides in ([], ["model.ffn_type=swiglu", "model.norm_type=rmsnorm", "model.tie_embeddings=true"]):
        cfg = load_config(CONFIGS[arch], overrides)
        model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
        assert sum(p.numel() for p in model.parameters()) == arch_spec(arch).param_count(cfg.model)


def _refusal_cases() -> list[tuple[str, tuple[str, ...]]]:
    return [(arch, r.example) for arch, spec in SPECS.items() for r in spec.refusals]


def _submit_main():
    spec = importlib.util.spec_from_file_location("megaret_submit", REPO / "launcher" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_dry_run_refuses_what_the_trainer_refuses_with_the_same_message(capsys):
    """Each spec's refusals (and the general ones), through `launcher/submit.py --dry-run` and
    `python -m megaret.train`: both exit 2 before any work with the same one-line message."""
    from megaret.train.__main__ import main as train

    submit = _submit_main()
    cases = [(CONFIGS[arch], example) for arch, example in _refusal_cases()]
    cases += [("configs/tiny.yaml", ("parallel.tensor=2", "parallel.sequence_parallel=true",
                                     "parallel.zero_stage=2")),
              ("configs/tiny.yaml", ("model.tie_embeddings=true", "parallel.pipeline=2"))]
    assert len(cases) >= 6
    for path, example in cases:
        codes = (submit(["--config", path, "--dry-run", *example]),
                 _exit_code(train, ["--config", path, *example]))
        err = capsys.readouterr().err.splitlines()
        assert codes == (2, 2), (path, example, codes, err)
        assert len(err) == 2 and err[0] == err[1], (path, example, err)  # the dry run == the trainer
        assert err[0].startswith("megaret: error: "), (path, example, err)


def _exit_code(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_no_arch_branches_outside_models():
    """What an arch is lives in its spec: no `arch ==` tests or model-class checks elsewhere."""
    pattern = re.compile(r"arch *(==|!=|in )|isinstance\([^)]*(RetNet|Transformer|BRT|KVCache)|_STATE_TYPES")
    # megaret/hf/modeling is the standalone code an HF export carries: it cannot import the specs
    skip = ("models", "config", "modeling")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
            for p in sorted((REPO / "megaret").rglob("*.py")) if p.parent.name not in skip
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
