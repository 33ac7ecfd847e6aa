"""Inference refuses misuse in one line, before any work: generate's sampling arguments out of
range, a KV cache that cannot fit in memory, evaluate's non-positive --context / --chunk and a
run that scores no token, export's --out that is not a file. The library raises the same
typed errors its callers get (InferenceError, ExportError); the CLIs exit 1 with one line."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megaret.config import load_config
from megaret.export import ExportError, export
from megaret.infer.decoding import generate, make_decoder, sample_next
from megaret.infer.loading import InferenceError
from megaret.infer.perplexity import evaluate_documents
from megaret.models.spec import build_model
from megaret.parallel.megatron_config import megatron_config
from tests.conftest import REPO
from tests.data_fixtures import build_tiny


def build(ctx1, name: str):
    cfg = load_config(f"configs/{name}.yaml")
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp).eval()


BAD_SAMPLING = [
    ({"top_p": 0.0}, "--top-p 0.0 is outside (0, 1]"),
    ({"top_p": 1.5}, "--top-p 1.5 is outside (0, 1]"),
    ({"top_p": math.nan}, "--top-p nan"),
    ({"top_k": -1}, "--top-k -1 is outside [0, inf)"),
    ({"temperature": -0.5}, "--temperature -0.5 is outside [0, inf)"),
    ({"temperature": math.inf}, "--temperature inf"),
    ({"temperature": math.nan}, "--temperature nan"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SAMPLING)
def test_sampling_arguments_out_of_range_raise(ctx1, kwargs, message):
    with pytest.raises(InferenceError) as exc:
        sample_next(torch.zeros(1, 8), **kwargs)
    assert message in str(exc.value)
    cfg, model = build(ctx1, "tiny")
    with pytest.raises(InferenceError) as exc:
        generate(model, torch.zeros(1, 3, dtype=torch.long), 4, **kwargs)
    assert message in str(exc.value)


def test_max_new_tokens_below_zero_raises_and_the_edges_keep_their_meaning(ctx1):
    cfg, model = build(ctx1, "tiny")
    x = torch.randint(cfg.model.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InferenceError, match="--max-new-tokens -1 is outside"):
        generate(model, x, -1)
    assert torch.equal(generate(model, x, 0), x)
    greedy = generate(model, x, 4, greedy=True)
    # temperature 0 is argmax; top_k 0 and top_p 1 filter nothing
    assert torch.equal(generate(model, x, 4, temperature=0.0, top_k=0, top_p=1.0), greedy)
    assert torch.equal(generate(model, x, 4, top_k=0, top_p=1.0, seed=3), generate(model, x, 4, seed=3))


def test_kv_cache_beyond_free_memory_is_refused_before_the_prefill(ctx1, monkeypatch):
    import megaret.infer.decoding as decoding

    cfg, model = build(ctx1, "transformer-tiny")
    x = torch.zeros(2, 7, dtype=torch.long)
    dec = make_decoder(model)
    with torch.no_grad():  # the estimate is the bytes of the keys and values reserve() allocates
        dec.prefill(x)
        dec.reserve(7 + 25)
    buffers = [s.buffer for s in dec.state.layers]
    assert dec.cache_bytes(2, 32) == sum(b.k.numel() * b.k.element_size() * 2 for b in buffers)
    monkeypatch.setattr(decoding, "free_memory", lambda device: dec.cache_bytes(2, 20))
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(a))
    with pytest.raises(InferenceError) as exc:
        generate(model, x, 25, greedy=True)
    msg = str(exc.value)
    assert "--max-new-tokens 25: the KV cache of model.arch=transformer for 7 + 25 tokens" in msg
    assert "lower --max-new-tokens (at most 13 fit)" in msg and not calls
    _, retnet = build(ctx1, "tiny")  # a state bounded in the context needs no room
    assert make_decoder(retnet).cache_bytes(2, 10**12) == 0
    monkeypatch.setattr(decoding, "free_memory", lambda device: 0)
    assert generate(retnet, x, 3, greedy=True).shape == (2, 10)


def test_evaluate_window_and_context_must_be_positive(ctx1):
    cfg, model = build(ctx1, "tiny")
    docs = [list(range(40))]
    with pytest.raises(InferenceError, match=r"--context 0 is outside \[1, inf\)"):
        evaluate_documents(model, docs, 0, 16)
    with pytest.raises(InferenceError, match=r"--chunk -4 is outside \[1, inf\)"):
        evaluate_documents(model, docs, 32, -4)


def test_export_refuses_a_directory_before_consolidating(tmp_path):
    with pytest.raises(ExportError, match=f"--out {tmp_path} is a directory"):
        export(tmp_path / "no-such-checkpoint", tmp_path)  # no CheckpointError: refused first
    (tmp_path / "f").write_text("")
    with pytest.raises(ExportError, match="is not a directory"):
        export(tmp_path / "no-such-checkpoint", tmp_path / "f" / "model.pt")


# -- the entry points: real processes, launched together (each pays ~5 s of imports), one case per
# check function (the other flags go through the same functions, tested in-process above) ---------

GENERATE = [sys.executable, "-m", "megaret.generate", "--config", "configs/tiny.yaml", "--prompt", "x"]
EVALUATE = [sys.executable, "-m", "megaret.evaluate", "--config", "configs/tiny.yaml"]
CLI_CASES = {
    "top-p": ("--top-p 1.5 is outside (0, 1]", [*GENERATE, "--top-p", "1.5"]),
    "kv-cache": ("--max-new-tokens 1000000000000: the KV cache of model.arch=transformer",
                 [sys.executable, "-m", "megaret.generate", "--config", "configs/transformer-tiny.yaml",
                  "--tokenizer", "{tokenizer}", "--prompt", "the state", "--max-new-tokens", str(10**12)]),
    "chunk": ("--chunk 0 is outside [1, inf)", [*EVALUATE, "--data", "{data}", "--chunk", "0"]),
    "no-tokens": ("no tokens scored: none of the", [*EVALUATE, "--data", "{data}", "--min-doc-tokens",
                                                    "1000000", "--context", "64"]),
    "export-out": ("megaret: error: --out {tmp} is a directory",
                   [sys.executable, "-m", "megaret.export", "--checkpoint", "{tmp}/none", "--out", "{tmp}"]),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    tmp = tmp_path_factory.mktemp("cli")
    data = build_tiny(tmp, mode="packed", seq_length=64, name="v", valid_fraction=0.3)
    where = {"data": str(data), "tokenizer": str(data.parent / "tokenizer.json"), "tmp": str(tmp)}
    procs = {name: subprocess.Popen([a.format(**where) for a in cmd], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (_, cmd) in CLI_CASES.items()}  # fmt: skip
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        runs[name] = (proc.returncode, err, CLI_CASES[name][0].format(**where))
    return runs


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_in_one_line(cli_runs, case):
    rc, err, message = cli_runs[case]
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert message in err, err
