"""Any tokenizer (issue 14, item 2): GPT-2/Llama-3-style byte-level BPE through tiktoken (id-identical to
HF tokenizers), Unigram and WordPiece through tokenizers, named special tokens, and the model
vocabulary padded from the tokenizer with the padded ids never predicted.

Every tokenizer is trained here with the real ``tokenizers`` library. No pretrained tokenizer.json
ships in an installed wheel: mistral-common ships sentencepiece ``.model`` files and Tekken json, not
the HF format (README: Your data and tokenizer).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from megaret.config import Config, ConfigError
from megaret.data.errors import DataError
from megaret.data.tokenizer import PROBE, Tokenizer
from megaret.data.vocab import padded_vocab_size, resolve_vocab
from tests.conftest import REPO
from tests.data_fixtures import WORDS

TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(120)) + f"\n\tx = {i} ** 2  # ok {i * 37}\n"
         for i in range(150)]
SAMPLES = [PROBE, "hello world", "  spaces  \n\n\t", "don't I'll 1234567890 3.14", "漢字 😀 Ünïcödé"]
# Llama-3's pre-tokenization regex (a Split before ByteLevel)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train(kind: str, path):
    """A HF tokenizer of `kind` trained on TEXTS, saved to `path`."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HF

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "gpt2":
        t = HF(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=alphabet)
    elif kind == "llama3":
        t = HF(models.BPE(ignore_merges=True))
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                      initial_alphabet=alphabet)
    elif kind == "unigram":
        t = HF(models.Unigram())
        t.pre_tokenizer = pre_tokenizers.Metaspace()
        t.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                          unk_token="<unk>")
    else:  # wordpiece
        t = HF(models.WordPiece(unk_token="[UNK]"))
        t.normalizer = normalizers.BertNormalizer()
        t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        t.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    t.train_from_iterator(TEXTS, trainer=trainer)
    t.save(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {k: _train(k, root / f"{k}.json") for k in ("gpt2", "llama3", "unigram", "wordpiece")}


def _hf_ids(path, texts):
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(path))
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.parametrize("kind, encoder, eos, bos", [
    ("gpt2", "tiktoken", "<|endoftext|>", "<|endoftext|>"),  # no begin token: the end token (as GPT-2)
    ("llama3", "tiktoken", "<|end_of_text|>", "<|begin_of_text|>"),
    ("unigram", "tokenizers", "</s>", "<s>"),
    ("wordpiece", "tokenizers", "[SEP]", "[CLS]"),
])
def test_each_kind_encodes_as_hf_tokenizers(files, kind, encoder, eos, bos) -> None:
    tok = Tokenizer(files[kind])
    assert (tok.encoder, tok.eos_token, tok.bos_token) == (encoder, eos, bos)
    from tokenizers import Tokenizer as HF

    assert tok.vocab_size == HF.from_file(str(files[kind])).get_vocab_size(with_added_tokens=True)
    texts = SAMPLES + TEXTS[:20]
    assert tok.encode_batch(texts) == _hf_ids(files[kind], texts) == [tok.encode(t) for t in texts]
    if encoder == "tiktoken":  # byte level: decoding gives back any text exactly
        assert all(tok.decode(tok.encode(t)) == t for t in SAMPLES)
        assert tok.eos_id not in tok.encode(f"a {eos} b")  # a special token's text is text


def test_tiktoken_only_where_the_ranks_follow_the_merges(files, tmp_path) -> None:
    """A byte-level BPE whose ids are not in merge order would merge differently in tiktoken: it is
    encoded by tokenizers instead, and still gives HF's ids."""
    spec = json.loads(files["gpt2"].read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    first, last = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    vocab[first], vocab[last] = vocab[last], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer(tmp_path)
    assert tok.encoder == "tokenizers"
    assert tok.encode_batch(TEXTS[:20]) == _hf_ids(tmp_path / "tokenizer.json", TEXTS[:20])
    assert Tokenizer(files["gpt2"], encoder="tokenizers").encoder == "tokenizers"


def test_special_tokens_named_or_refused(files) -> None:
    tok = Tokenizer(files["wordpiece"], eos_token="[CLS]", bos_token="[SEP]")
    assert (tok.eos_token, tok.bos_token, tok.eos_id, tok.bos_id) == ("[CLS]", "[SEP]", 1, 2)
    with pytest.raises(DataError, match=r"has no token '<\|im_end\|>' \(--eos-token\); its special tokens: "
                                        r"<\|begin_of_text\|>, <\|end_of_text\|>"):
        Tokenizer(files["llama3"], eos_token="<|im_end|>")
    spec = json.loads(files["unigram"].read_text())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] == "<unk>"]
    del spec["model"]["vocab"][2]  # "</s>"
    bare = files["unigram"].with_name("bare.json")
    bare.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"has none of the usual end-of-document tokens .*; its special "
                                        r"tokens: <unk>; name one with --eos-token TOKEN"):
        Tokenizer(bare)


def test_build_shards_with_a_gpt2_tokenizer_from_parquet(files, tmp_path) -> None:
    """build_shards.py --tokenizer gpt2.json --input 'dir/*.parquet': the manifest names the special
    tokens; the packed stream decodes to the documents joined by <|endoftext|>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megaret.data.shards import load_manifest, open_split

    (tmp_path / "in").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"body": TEXTS[i * 10: i * 10 + 10]}), tmp_path / "in" / f"part{i}.parquet")
    out = tmp_path / "shards"
    proc = subprocess.run(
        [sys.executable, "data_tools/build_shards.py", "--input", str(tmp_path / "in" / "*.parquet"),
         "--text-key", "body", "--tokenizer", str(files["gpt2"]), "--output", str(out), "--seq-length", "32",
         "--valid-fraction", "0.1"], capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "end '<|endoftext|>' (id 0), begin '<|endoftext|>' (id 0), encoded with tiktoken" in proc.stderr
    assert "tokens/s" in proc.stderr  # the progress bar
    m, _ = load_manifest(out)
    assert {k: m["tokenizer"][k] for k in ("eos_token", "bos_token", "encoder")} == {
        "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "encoder": "tiktoken"}
    assert m["splits"]["train"]["documents"] + m["splits"]["valid"]["documents"] == 30
    tok = Tokenizer(out)
    s = open_split(out, "train", tokenizer=tok)
    samples = [s.read_usable(i)[0] for i in range(s.num_samples)]
    stream = [int(t) for t in samples[0]] + [int(t) for x in samples[1:] for t in x[1:]]
    docs = tok.decode(stream).split("<|endoftext|>")
    assert docs[0] in TEXTS[:30] and all(d in TEXTS[:30] for d in docs[1:-1]) and len(docs) > 5


def _cfg(**model) -> Config:
    return Config.from_dict({"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                       "ffn_hidden_size": 64, "chunk_size": 8, **model},
                             "data": {"seq_length": 16, "source": "shards", "paths": ["unused"]}})


def test_vocab_padded_from_the_tokenizer() -> None:
    cfg = _cfg()
    assert cfg.model.vocab_size is None
    resolve_vocab(cfg, 50257, read_data=False)  # GPT-2's count
    assert (cfg.model.vocab_size, cfg.model.tokenizer_vocab_size) == (50304, 50257)  # Megatron's 50304
    cfg = _cfg(vocab_multiple=64)
    resolve_vocab(cfg, 601, read_data=False)
    assert cfg.model.vocab_size == 640 == padded_vocab_size(601, 64)
    cfg = _cfg(vocab_size=1024)  # an explicit size stays; the tokenizer's count masks the rest
    resolve_vocab(cfg, 601, read_data=False)
    assert (cfg.model.vocab_size, cfg.model.tokenizer_vocab_size) == (1024, 601)
    with pytest.raises(ConfigError, match=r"the data's tokenizer has 601 ids but model.vocab_size=512; set "
                                          r"model.vocab_size >= 601 \(e.g. 640\) or model.vocab_size=null"):
        resolve_vocab(_cfg(vocab_size=512), 601, read_data=False)
    tp4 = _cfg(vocab_multiple=6)
    tp4.parallel.tensor = 4
    with pytest.raises(ConfigError, match=r"pads the tokenizer's ids to 606, a multiple of "
                                          r"model.vocab_multiple=6 that parallel.tensor=4 does not divide; "
                                          r"set model.vocab_multiple to a multiple of 4 \(e.g. 8\)"):
        resolve_vocab(tp4, 601, read_data=False)


def test_padded_ids_are_never_predicted(ctx1) -> None:
    """Logits of the padded ids are -inf; the loss is the cross-entropy over the tokenizer's ids only,
    with the same weights as an unmasked model; on another TP rank's slice the right columns go."""
    from megaret.models.spec import build_model
    from megaret.models.stage import StagedLanguageModel
    from megaret.parallel.megatron_config import megatron_config

    cfg = _cfg(vocab_size=256, tokenizer_vocab_size=200, dropout=0.0)
    torch.manual_seed(0)
    masked = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx1.tp)
    plain_cfg = _cfg(vocab_size=256, dropout=0.0)
    plain = build_model(plain_cfg.model, megatron_config(plain_cfg.model, plain_cfg.parallel), ctx1.tp)
    plain.load_state_dict(masked.state_dict())
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    # (logits without labels: megatron's fp32 cross-entropy overwrites its input with the softmax)
    logits, ref_logits = masked(tokens).logits, plain(tokens).logits
    assert torch.isneginf(logits[..., 200:]).all() and torch.isfinite(logits[..., :200]).all()
    assert torch.equal(logits[..., :200], ref_logits[..., :200])
    out, ref = masked(tokens, labels), plain(tokens, labels)
    expect = torch.nn.functional.cross_entropy(ref_logits[..., :200].reshape(-1, 200).double(),
                                               labels.reshape(-1), reduction="none").view(2, 16)
    torch.testing.assert_close(out.loss.double(), expect, rtol=1e-5, atol=1e-6)
    assert (out.loss < ref.loss).all()  # the padding took softmax mass from every target
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in masked.parameters() if p.grad is not None)
    # TP rank 1 of 2 holds ids 128..255: its columns 72.. (ids 200..) are masked
    half = types.SimpleNamespace(cfg=cfg.model, tp=types.SimpleNamespace(rank=1))
    cols = StagedLanguageModel.mask_padding(half, torch.zeros(3, 2, 128))
    assert torch.isneginf(cols[..., 72:]).all() and (cols[..., :72] == 0).all()
    first = types.SimpleNamespace(cfg=cfg.model, tp=types.SimpleNamespace(rank=0))
    assert (StagedLanguageModel.mask_padding(first, torch.zeros(3, 2, 128)) == 0).all()


def test_training_sizes_the_model_from_the_tokenizer(files, tmp_path) -> None:
    """model.vocab_size=null on shards of a GPT-2-style tokenizer of 513..640 ids: the run trains a 640-row
    model (multiple 128), and run.dir/config.yaml and the checkpoint (which resharding and export read) keep
    640 with the padded ids masked."""
    from megaret.checkpoint.consolidate import load_checkpoint
    from megaret.config import load_config
    from megaret.data import build_shards
    from megaret.data.corpus import Source
    from megaret.infer.loading import load_weights
    from megaret.models.spec import build_model
    from megaret.parallel.context import build_parallel_context
    from megaret.parallel.megatron_config import megatron_config

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    manifest = build_shards([Source("docs", str(tmp_path / "docs.jsonl"))], tmp_path / "shards",
                            seq_length=64, tokenizer=files["gpt2"], valid_fraction=0.1, log=lambda *a: None)
    n = Tokenizer(files["gpt2"]).vocab_size
    assert 512 < n <= 640
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megaret.train", "--config", "configs/tiny.yaml", "model.vocab_size=null",
         f"data.paths=[{manifest}]", "train.steps=2", "checkpoint.interval=2", "train.eval_interval=0",
         f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_config(run).model
    assert (saved.vocab_size, saved.tokenizer_vocab_size) == (padded_vocab_size(n, 128), n) == (640, n)
    state, cfg, manifest_ = load_checkpoint(run)
    assert (cfg.model.vocab_size, cfg.model.tokenizer_vocab_size) == (640, n)
    assert manifest_["identity"]["model.vocab_size"] == 640
    assert state["embedding.weight"].shape[0] == 640
    ctx = build_parallel_context(1, 1, seed=0, backend="gloo")
    model = build_model(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp)
    load_weights(model, state)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 7]])).logits
    assert torch.isneginf(logits[..., n:]).all() and torch.isfinite(logits[..., :n]).all()
