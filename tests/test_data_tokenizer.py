"""Tokenizer: exact round trip, HF == tiktoken ids, special tokens."""

from __future__ import annotations

import pytest

from megaret.data.errors import DataError
from megaret.data.tokenizer import Tokenizer, train_tokenizer
from tests.data_fixtures import WORDS


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [
        " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(200)) + f"\n\tx = {i} ** 2  # ok\n"
        for i in range(200)
    ]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


SAMPLES = [
    "",
    "hello world",
    "the retention state of the model",
    "Ünïcödé ✓ 漢字 😀 \x00\x7f",
    "  leading and trailing spaces  \n\n\t",
    "literal <eos> and <bos> stay text",
    "def f(x):\n    return x ** 2\n",
    "don't won't I'll they've",
    "1234567890 3.14159",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_specials_and_vocab(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert 258 < tok.vocab_size <= 400
    assert tok.dtype == "uint16"
    assert tok.eos_id not in tok.encode("a <eos> b")  # specials never come from text
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "<bos>hi<eos>"
    assert all(0 <= i < tok.vocab_size for i in tok.encode(" ".join(SAMPLES)))


def test_tiktoken_matches_hf(tok: Tokenizer) -> None:
    tok.check_hf([s for s in SAMPLES if "<" not in s] + [" ".join(WORDS) * 3])
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_reload_same_hash(tok: Tokenizer) -> None:
    again = Tokenizer(tok.path.parent)
    assert again.sha256 == tok.sha256 and again.encode("retention model") == tok.encode("retention model")


def test_bad_tokenizer_file(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer(tmp_path / "bad.json")
