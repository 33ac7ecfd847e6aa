"""Hugging Face export and lm-evaluation-harness (issue 14, items 4 and 5).

One session fixture trains a tiny model of every arch 3 steps in ONE process (RetNet in bf16, the
two Transformer baselines transformers ships natively as GPT-NeoX and Llama, the sliding-window
Transformer, BRT) on synthetic batches, with the tokenizer of a tiny corpus (300 ids: the
model's 512-row vocabulary is padded); each run is exported with `--format hf`. The tests load
every export with `AutoModelForCausalLM` / `AutoTokenizer` (CPU, fp32) and compare with megaret
on the same weights: logits within 1e-5, greedy `generate()` equal to `megaret.generate` with
the state carried (one token per call after the prompt). A TP=2 checkpoint's export is checked in
tests/test_checkpoint.py (its multi-rank fixture).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megaret.checkpoint.consolidate import checkpoint_config, export_weights
from megaret.checkpoint.files import resolve, verify
from megaret.checkpoint.reshard import consolidate_training_state
from megaret.data import Tokenizer, open_split
from megaret.export import main as export_main
from megaret.hf.write import export_dir
from megaret.infer.decoding import generate
from megaret.infer.loading import load_weights
from megaret.infer.perplexity import evaluate_documents, iter_documents
from megaret.models.spec import arch_spec, build_model
from megaret.parallel.megatron_config import megatron_config
from tests.conftest import REPO
from tests.data_fixtures import build_tiny

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

TOL = 1e-5  # max |logits difference|, fp32
COMMON = ["data.source=synthetic", "train.steps=3", "checkpoint.interval=3", "train.eval_steps=0",
          "train.log_interval=100", "logging.tensorboard=false"]
RUNS = {  # name: (config, overrides, the class the export loads as)
    "retnet": ("configs/tiny.yaml", ["train.precision=bf16"], "MegaretForCausalLM"),
    "transformer": ("configs/transformer-tiny.yaml", [], "GPTNeoXForCausalLM"),
    "llama": ("configs/transformer-tiny.yaml", ["model.norm_type=rmsnorm", "model.ffn_type=swiglu",
                                                "model.tie_embeddings=true"], "LlamaForCausalLM"),
    "sliding": ("configs/sliding-tiny.yaml", [], "MegaretForCausalLM"),
    "brt": ("configs/brt-tiny.yaml", [], "MegaretForCausalLM"),
}
TRAIN_ALL = """
import json, sys
from megaret.train.__main__ import main
for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
"""


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The five runs, trained once, and their `--format hf` exports (one through the CLI)."""
    root = tmp_path_factory.mktemp("hf_export")
    manifest = build_tiny(root, seq_length=64, name="corpus")
    argv = [["--config", cfg, *COMMON, f"data.paths=[{manifest}]", *extra, f"run.dir={root / name}"]
            for name, (cfg, extra, _) in RUNS.items()]
    proc = subprocess.run([sys.executable, "-c", TRAIN_ALL, json.dumps(argv)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for name in RUNS:
        out[name] = root / f"{name}-hf"
        if name == "retnet":  # the CLI (in process: its one line and exit code are another test's)
            args = ["--checkpoint", str(root / name), "--format", "hf", "--out", str(out[name])]
            assert export_main(args) == 0
        else:
            export_dir(root / name, out[name], "hf")
    tok = Tokenizer(Path(manifest).parent / "tokenizer.json")
    return types.SimpleNamespace(root=root, manifest=manifest, out=out, tok=tok)


def megaret_model(run: Path, ctx) -> tuple[torch.nn.Module, object]:
    """megaret's model of a run with the weights the export wrote (the fp32 masters)."""
    state, _, cfg = export_weights(run)
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp).eval()
    load_weights(model, state, "--checkpoint")
    return model, cfg


def hf_model(out: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_export_loads_and_gives_megarets_logits(trained, ctx1, name):
    out = trained.out[name]
    hf, hf_tok = hf_model(out)
    assert type(hf).__name__ == RUNS[name][2]
    remote = RUNS[name][2] == "MegaretForCausalLM"
    assert sorted(p.name for p in out.glob("*.py")) == (
        ["configuration_megaret.py", "modeling_megaret.py"] if remote else [])
    assert ("auto_map" in json.loads((out / "config.json").read_text())) == remote
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    text = "def main(): return 42 # Ünïcödé ✓"
    assert hf_tok(text)["input_ids"] == trained.tok.encode(text)  # no <bos> added, the same ids
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (trained.tok.bos_id, trained.tok.eos_id)
    model, cfg = megaret_model(trained.root / name, ctx1)
    x = torch.randint(cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x).logits, hf(x).logits
        print(name, "max |logits - megaret|", float((got - want).abs().max()), "of", float(want.abs().max()))
        assert (got - want).abs().max() <= TOL
        if name == "brt":  # a call that ends inside a block: run padded, as megaret.evaluate pads
            assert (hf(x[:, :40]).logits - want[:, :40]).abs().max() <= TOL


@pytest.mark.parametrize("name", sorted(RUNS))
def test_generate_carries_the_state_and_equals_megaret_generate(trained, ctx1, name):
    hf, _ = hf_model(trained.out[name])
    model, _ = megaret_model(trained.root / name, ctx1)
    tok = trained.tok
    prompt = torch.tensor([tok.encode("def main(self, value")])  # 7 tokens; BRT crosses a block of 16
    calls = []
    hook = hf.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
    with torch.no_grad():
        got = hf.generate(prompt, max_new_tokens=14, do_sample=False)
    hook.remove()
    want = generate(model, prompt, 14, greedy=True, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    assert torch.equal(got, want), (got, want)
    assert calls == [prompt.shape[1]] + [1] * (got.shape[1] - prompt.shape[1] - 1)  # O(new tokens) each
    if name == "retnet":  # the carried state is the per-layer (B, H, Dk, Dv) matrices: O(1) per token
        out = hf(prompt, use_cache=True)
        step = hf(prompt[:, :1], cache=out.cache, use_cache=True)
        assert [s.shape for s in step.cache.layers] == [(1, 4, 16, 32)] * 2
        whole = hf(torch.cat([prompt, prompt[:, :1]], dim=1)).logits[:, -1]
        assert (step.logits[:, -1] - whole).abs().max() <= TOL


def test_bf16_run_exports_the_fp32_masters(trained):
    """RetNet trained in bf16: the export holds the optimizer's fp32 masters, not the bf16 weights."""
    from safetensors.torch import load_file

    from megaret.checkpoint.upgrade import split_named

    ckpt = resolve(trained.root / "retnet")
    masters = consolidate_training_state(ckpt, verify(ckpt)).params
    m = checkpoint_config(verify(ckpt)).model  # the remote code's separate q/k/v/g projections:
    masters = split_named(masters, arch_spec("retnet").fused_weights(m))  # the fused one split
    exported = load_file(str(trained.out["retnet"] / "model.safetensors"))
    assert exported.keys() == masters.keys()
    assert all(torch.equal(exported[k], masters[k]) for k in masters)
    assert any(not torch.equal(v.bfloat16().float(), v) for v in exported.values())  # not bf16 values
    meta = json.loads((trained.out["retnet"] / "export.json").read_text())
    assert meta["weights"] == "fp32 optimizer masters" and meta["step"] == 3 and meta["remote_code"]


def test_the_modeling_code_imports_torch_and_transformers_only(trained):
    allowed = {"__future__", "math", "dataclasses", "torch", "transformers"}
    for path in trained.out["brt"].glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." if node.level else node.module]
            else:
                continue
            assert all(n == "." or n.split(".")[0] in allowed for n in names), (path.name, names)


def test_variants_match_megaret(trained, ctx1, tmp_path):
    """The branches the trained runs do not take, on random weights: loglinear decays, tied
    embeddings, RMSNorm/SwiGLU RetNet with value_factor 1; a LayerNorm/SwiGLU Transformer (no native
    class: remote code); BRT with LSTM gates and the state MLP."""
    from megaret.config import load_config
    from megaret.hf.write import write_hf

    variants = {
        "retnet": ("configs/tiny.yaml", ["model.decay_schedule=loglinear", "model.tie_embeddings=true",
                                         "model.norm_type=rmsnorm", "model.ffn_type=swiglu",
                                         "model.value_factor=1"]),
        "transformer": ("configs/transformer-tiny.yaml", ["model.ffn_type=swiglu"]),
        "brt": ("configs/brt-tiny.yaml", ["model.gate_type=lstm", "model.state_skip=false",
                                          "model.ffn_type=swiglu", "model.recurrent_layers=[0,2]"]),
    }
    for name, (path, overrides) in variants.items():
        cfg = load_config(path, overrides)
        torch.manual_seed(0)
        model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp).eval()
        with torch.no_grad():  # weights far from their initialisation (e.g. gates not at their biases)
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out = tmp_path / name
        out.mkdir()
        assert write_hf(out, model.state_dict(), cfg, trained.tok).architecture == "MegaretForCausalLM"
        hf, _ = hf_model(out)
        x = torch.randint(cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert (hf(x).logits - model(x).logits).abs().max() <= TOL, name
        got = hf.generate(x[:1, :5], max_new_tokens=12, do_sample=False)
        assert torch.equal(got, generate(model, x[:1, :5], 12, greedy=True, eos_id=trained.tok.eos_id,
                                          vocab_size=trained.tok.vocab_size)), name


def test_safetensors_format(trained, ctx1, tmp_path):
    """--format safetensors: megaret's names without megatron's _extra_state, config.yaml, tokenizer.json;
    `megaret.generate --config OUT --weights OUT/model.safetensors` loads it."""
    from megaret.config import load_config

    out, meta = export_dir(trained.root / "sliding", tmp_path / "st", "safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors",
                                                     "tokenizer.json"]
    cfg = load_config(out)
    assert cfg.model.arch == "sliding" and cfg.parallel.tensor == 1 and meta["format"] == "safetensors"
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp).eval()
    load_weights(model, out / "model.safetensors")
    ref, _ = megaret_model(trained.root / "sliding", ctx1)
    x = torch.randint(cfg.model.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_export_refuses_a_file_or_a_full_directory_in_one_line(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    for out, why in ((tmp_path / "file", "is a file"), (tmp_path / "full", "is not empty")):
        with pytest.raises(SystemExit) as exc:
            export_main(["--checkpoint", str(trained.root / "sliding"), "--format", "hf", "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("megaret: error: --out") and why in err and "\n" not in err
    assert (tmp_path / "full" / "keep").read_text() == "x"


def test_zero3_checkpoints_are_refused_in_one_line(trained, tmp_path, capsys):
    """ZeRO-3 partitions the weights over data parallel; export reads ZeRO <= 2 (a manifest that says
    zero_stage 3 is refused before any file is read as one)."""
    import shutil

    ckpt = tmp_path / "step"
    shutil.copytree(resolve(trained.root / "sliding"), ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["model"]["zero_stage"] = 3
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exc:
        export_main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "ZeRO-3" in err and "parallel.zero_stage <= 2" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness


TASK = """task: megaret_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def test_lm_eval_log_likelihood_equals_megaret_evaluate(trained, ctx1, tmp_path, monkeypatch):
    """`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True --tasks megaret_heldout
    --include_path DIR` on a local task (YAML + JSON lines of the held-out split's documents, each
    shorter than the model's 64-token window, so lm-eval scores it in one window after its <bos>
    prefix): the summed log-likelihood (lm-eval's per-document values, log_samples) equals minus the
    summed token losses megaret.evaluate's `evaluate_documents` gives for [<bos>] + the document."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok = trained.tok
    texts = []
    for ids in iter_documents(open_split(trained.manifest, "valid")):
        ids = [int(i) for i in ids if i not in (tok.bos_id, tok.eos_id)][:40]
        text = tok.decode(ids).strip()
        if text and "\ufffd" not in text and len(tok.encode(text)) < 63:
            texts.append(text)
    texts = texts[:6]
    assert len(texts) >= 3
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "task.yaml").write_text(TASK.format(docs=docs, cache=tmp_path / "cache"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={trained.out['retnet']},trust_remote_code=True",
        tasks=["megaret_heldout"], task_manager=TaskManager(include_path=str(tmp_path)), device="cpu",
        batch_size=1, log_samples=True)
    samples = results["samples"]["megaret_heldout"]
    by_text = {s["doc"]["text"]: float(s["filtered_resps"][0]) for s in samples}
    assert sorted(by_text) == sorted(texts)
    model, _ = megaret_model(trained.root / "retnet", ctx1)
    ours = evaluate_documents(model, [np.array([tok.bos_id, *tok.encode(t)]) for t in texts], context=64,
                              window=64)
    total = sum(by_text.values())
    print(f"lm-eval total log-likelihood {total:.6f}, megaret -sum(loss) {-ours.nll:.6f} over {ours.tokens} "
          f"tokens; byte_perplexity {results['results']['megaret_heldout']['byte_perplexity,none']:.4f}")
    assert ours.documents == len(texts)
    assert abs(total + ours.nll) <= 1e-4 * ours.tokens
