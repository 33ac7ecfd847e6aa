"""Any Hugging Face ``tokenizer.json``; byte-level BPE encoded through ``tiktoken`` where proven equal.

A :class:`Tokenizer` loads any ``tokenizer.json`` that HF ``tokenizers`` reads (byte-level BPE as
GPT-2, Llama-3 or Qwen use; Unigram; WordPiece; sentencepiece-style BPE) and encodes with
``tokenizers``' batch encoding. When the file is a byte-level BPE that ``tiktoken`` can run (the
pre-tokenizer is ByteLevel's GPT-2 regex or a Split regex followed by ByteLevel, no normalizer,
every byte a token, merges in rank order), the vocabulary is converted once (token strings in the
GPT-2 byte alphabet -> raw bytes, id = rank) and encoding goes through tiktoken instead, ~10x faster
on two cores; that fast path is taken only after it gave the same ids as ``tokenizers`` on a probe
text (:data:`PROBE`), else ``tokenizers`` encodes (:attr:`Tokenizer.encoder` says which).

Special tokens: the end-of-document token (``eos``, appended to every document) and the
begin-of-document token (``bos``, the first token of a segments-mode document) are named with
``eos_token``/``bos_token`` or found among the tokenizer's tokens by common names
(:data:`EOS_NAMES`, :data:`BOS_NAMES`); a tokenizer without a begin token uses its end token (as
GPT-2 does). Special tokens are never produced from text: ``encode`` treats a literal
``"<|endoftext|>"`` in a document as ordinary text.

:func:`train_tokenizer` trains megaret's default byte-level BPE with ``<bos>`` (id 0) and ``<eos>``
(id 1).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megaret.data.errors import DataError, existing_file

BOS = "<bos>"
EOS = "<eos>"
SPECIAL_TOKENS = (BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"
#: end-of-document tokens looked for, in this order, when none is named (--eos-token)
EOS_NAMES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "[SEP]", "<|eot_id|>")
#: begin-of-document tokens looked for when none is named (--bos-token); none found: the eos token
BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<|startoftext|>", "[CLS]")
# GPT-2's pre-tokenization pattern, the one HF's ByteLevel(use_regex=True) applies.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: the text both encoders must agree on before tiktoken is trusted with a byte-level BPE
PROBE = (
    "The retention state of the model, don't won't I'll they've WE'RE. 1234567890 3.14159 $42\n"
    "  leading and trailing spaces  \n\n\t\tdef f(x):\n    return x ** 2  # ok\r\n"
    "Ünïcödé ✓ 漢字かなカナ 한국어 Ελληνικά русский العربية हिन्दी 😀👍🏽 \x00\x7f\u200b"
    "https://example.org/a?b=c&d=e <html><p>x</p></html> {\"k\": [1, 2]}   \n"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what HF ByteLevel vocabularies use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids on ``texts``; save ``out_dir/tokenizer.json``.

    A small corpus may yield fewer ids than asked (the trainer stops when no pair repeats); the
    real size is :attr:`Tokenizer.vocab_size`, which must not exceed ``model.vocab_size``.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258 + 1:
        raise DataError(
            f"tokenizer vocab_size={vocab_size} is too small: byte-level BPE needs > 258 (256 bytes "
            "+ <bos>/<eos>); use e.g. 512"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tok.save(str(path))
    return Tokenizer(path)


def tokenizer_sha256(path: str | Path) -> tuple[Path, str]:
    """(the tokenizer file, the sha256 of its bytes) of a tokenizer.json or a folder holding one."""
    p = existing_file(path, TOKENIZER_FILE, "tokenizer file", "train one with data_tools/build_shards.py "
                      "or point data.tokenizer at a tokenizer.json")
    return p, hashlib.sha256(p.read_bytes()).hexdigest()


class Tokenizer:
    """A HF ``tokenizer.json`` with its end/begin-of-document tokens; tiktoken-encoded when proven equal.

    ``encode(text)`` -> list of ids (no specials added); ``decode(ids)`` -> text. ``encoder`` is
    "tiktoken" or "tokenizers" (``encoder="tokenizers"`` keeps tiktoken out); ``vocab_size`` is one
    more than the largest id.
    """

    def __init__(
        self, path: str | Path, *, eos_token: str | None = None, bos_token: str | None = None,
        encoder: str = "auto",
    ) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        p, self.sha256 = tokenizer_sha256(path)
        self.path = p
        raw = p.read_text(encoding="utf-8")
        try:
            spec = json.loads(raw)
            spec["model"]["type"]  # noqa: B018 - a HF tokenizer.json names its model type
            self._hf = HFTokenizer.from_str(raw)
        except Exception as exc:  # noqa: BLE001 - json, key and the Rust parser's errors alike
            raise DataError(f"tokenizer file {p} is not a Hugging Face tokenizer.json ({exc}); "
                            "pass the tokenizer.json of a HF tokenizer (tokenizers.Tokenizer.save)") from exc
        self._hf.encode_special_tokens = True  # specials in a document stay text, as with tiktoken
        vocab = self._hf.get_vocab(with_added_tokens=True)  # token -> id
        self.vocab_size = max(vocab.values()) + 1
        added = spec.get("added_tokens") or []
        specials = [a["content"] for a in added if a.get("special", True)]
        self.eos_token = _special(p, vocab, specials, eos_token, EOS_NAMES, "end-of-document", "--eos-token")
        found_bos = bos_token or next((n for n in BOS_NAMES if n in vocab), None)
        self.bos_token = _special(p, vocab, specials, found_bos, (), "begin-of-document", "--bos-token") \
            if found_bos else self.eos_token
        self.eos_id, self.bos_id = vocab[self.eos_token], vocab[self.bos_token]
        self._enc, self._nfc = None, False
        self.encoder = "tokenizers"
        if encoder not in ("auto", "tokenizers"):
            raise DataError(f"encoder={encoder!r} is not one of auto, tokenizers")
        fast = _tiktoken_plan(spec) if encoder == "auto" else None
        if fast is not None:
            import tiktoken

            pattern, ranks, self._nfc = fast
            self._enc = tiktoken.Encoding(
                name=f"megaret-{self.sha256[:12]}", pat_str=pattern, mergeable_ranks=ranks,
                special_tokens={a["content"]: a["id"] for a in added if a["content"].encode() not in ranks},
            )  # fmt: skip
            if self._enc.encode_ordinary(self._norm(PROBE)) == self._hf_encode([PROBE])[0]:
                self.encoder = "tiktoken"
            else:
                self._enc = None

    @property
    def dtype(self) -> str:
        """Smallest unsigned integer type that holds every id ("uint16" or "uint32")."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def describe(self) -> dict[str, Any]:
        """What a shard manifest records of this tokenizer."""
        return {"file": TOKENIZER_FILE, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "encoder": self.encoder}  # fmt: skip

    def _norm(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self._nfc else text

    def _hf_encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings inside it are encoded as plain text."""
        if self._enc is not None:
            return self._enc.encode_ordinary(self._norm(text))
        return self._hf_encode([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """Ids of each text, encoded on ``num_threads`` threads (tiktoken; tokenizers uses its own pool)."""
        if self._enc is not None:
            return self._enc.encode_ordinary_batch([self._norm(t) for t in texts], num_threads=num_threads)
        return self._hf_encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens rendered by name, e.g. ``<bos>``/``<eos>``)."""
        if self._enc is not None:
            return self._enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def check_hf(self, texts: Iterable[str]) -> None:
        """Raise DataError unless HF ``tokenizers`` gives the same ids as :meth:`encode` on ``texts``."""
        for text in texts:
            a = self.encode(text)
            b = self._hf_encode([text])[0]
            if a != b:
                raise DataError(f"tokenizer {self.path}: {self.encoder} and HF tokenizers disagree on "
                                f"{text[:60]!r}")


def _special(p: Path, vocab: dict[str, int], specials: list[str], name: str | None,
             names: Sequence[str], what: str, flag: str) -> str:
    """The named special token, or the first of ``names`` the tokenizer has; DataError otherwise."""
    if name is None:
        name = next((n for n in names if n in vocab), None)
        if name is None:
            have = ", ".join(specials[:8]) or "none"
            raise DataError(f"tokenizer file {p} has none of the usual {what} tokens ({', '.join(names)}); "
                            f"its special tokens: {have}; name one with {flag} TOKEN")
    if name not in vocab:
        have = ", ".join(specials[:8]) or "none"
        raise DataError(f"tokenizer file {p} has no token {name!r} ({flag}); its special tokens: {have}")
    return name


def _tiktoken_plan(spec: dict[str, Any]) -> tuple[str, dict[bytes, int], bool] | None:
    """(pre-tokenizer regex, byte ranks, NFC first?) when tiktoken can run this BPE, else None."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or any(model.get(k) for k in (
            "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "dropout")):
        return None
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return None
    pattern = _byte_level_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None
    added = spec.get("added_tokens") or []
    if any(not a.get("special", True) for a in added):
        return None  # non-special added tokens are split out of text by tokenizers, not by tiktoken
    special = {a["content"] for a in added}
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, idx in model.get("vocab", {}).items():
        if token in special:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = idx
        except KeyError:
            return None  # not in the GPT-2 byte alphabet
    if any(bytes([b]) not in ranks for b in range(256)):
        return None  # tiktoken needs every single byte
    last = -1
    for merge in model.get("merges", []):  # tiktoken merges by rank: ranks must follow the merge order
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        try:
            rank = ranks[bytes(byte_of[c] for c in a + b)]
        except KeyError:
            return None
        if rank <= last:
            return None
        last = rank
    return pattern, ranks, norm is not None


def _byte_level_pattern(pre: dict[str, Any] | None) -> str | None:
    """The regex a byte-level pre-tokenizer splits with (GPT-2's, or a Split's before ByteLevel)."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return _GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    return regex
