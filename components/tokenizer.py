"""Tokenizers: one small `Tokenizer` over three kinds, selected by `data.tokenizer`.

- bpe:  byte-level BPE trained with HuggingFace `tokenizers` (GPT-2 style pre-tokenization),
        saved in HF's own tokenizer.json format, so `tokenizers.Tokenizer.from_file` reads it too.
- char: one token per character of the training corpus; unknown characters are an error.
- byte: one token per byte value 0..255.
Every kind has the special `<|endoftext|>` token (EOT), which the prepare stage appends to each
document. Inside document text the literal string "<|endoftext|>" is ordinary text, never EOT.

    python -c "from components.tokenizer import Tokenizer; print(Tokenizer.load('data/prepared/tokenizer.json'))"
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
KINDS = ("bpe", "char", "byte")


class Tokenizer:
    """encode/decode text, plus what the evaluation needs: eot_id and token_bytes().

    Exactly one backend is set: `hf` for bpe, `chars` (id -> character) for char; byte needs none.
    """

    def __init__(self, kind: str, hf: HFTokenizer | None = None, chars: list[str] | None = None):
        assert kind in KINDS, kind
        assert (hf is not None) == (kind == "bpe") and (chars is not None) == (kind == "char")
        self.kind, self.hf, self.chars = kind, hf, chars
        if kind == "bpe":
            hf.encode_special_tokens = True   # document text never produces EOT (not saved by HF: set on load)
            self.eot_id = hf.token_to_id(EOT)
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        elif kind == "char":
            self.index = {c: i for i, c in enumerate(chars)}
            self.eot_id = len(chars)
            self.vocab_size = len(chars) + 1
        else:
            self.eot_id = 256
            self.vocab_size = 257
        assert self.eot_id is not None, "the BPE tokenizer has no <|endoftext|> token"

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def encode(self, text: str) -> list[int]:
        if self.kind == "bpe":
            return self.hf.encode(text, add_special_tokens=False).ids
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary (it was not in the "
                             f"training corpus); use data.tokenizer 'byte' or 'bpe', which cover all text") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text; the bpe kind encodes in parallel (Rust threads)."""
        if self.kind == "bpe":   # encode_batch_fast (tokenizers >= 0.21): the same ids, ~25% faster, no offsets
            encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """EOT decodes to "<|endoftext|>"; bytes that do not form whole characters decode to U+FFFD."""
        if self.kind == "bpe":
            return self.hf.decode(list(ids), skip_special_tokens=False)
        if self.kind == "char":
            return "".join(EOT if i == self.eot_id else self.chars[i] for i in ids)
        out, run = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out += [run.decode("utf-8", errors="replace"), EOT]
                run = bytearray()
            else:
                run.append(i)
        return "".join(out) + run.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token id's text (0 for EOT): bits per byte = nats / ln 2 / bytes."""
        if self.kind == "byte":
            return [1] * 256 + [0]
        if self.kind == "char":
            return [len(c.encode("utf-8")) for c in self.chars] + [0]
        # Byte-level BPE spells every byte as one printable character of a 256-letter alphabet.
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        out = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            assert i == self.eot_id or set(token) <= alphabet, f"token {i} {token!r} is not byte-level"
            out.append(0 if i == self.eot_id else len(token))
        return out

    def save(self, path: str | Path) -> None:
        if self.kind == "bpe":
            text = self.hf.to_str(pretty=True)
        else:
            chars = {"chars": self.chars} if self.kind == "char" else {}
            text = json.dumps({"archflow_tokenizer": self.kind, **chars}, indent=2)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read what save() wrote: our small JSON for char/byte, HF's tokenizer.json for bpe."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        kind = raw.get("archflow_tokenizer", "bpe")
        if kind == "bpe":
            return cls("bpe", hf=HFTokenizer.from_str(json.dumps(raw)))
        return cls(kind, chars=raw.get("chars"))


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    """A tokenizer of `kind` for `texts`; vocab_size is used by bpe only (an upper bound there)."""
    if kind == "byte":
        return Tokenizer("byte")
    if kind == "char":
        return Tokenizer("char", chars=sorted(set().union(*map(set, texts))))
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    # All 256 bytes are in the vocabulary, so any text encodes; EOT is id 0, then bytes, then merges.
    # A small corpus may stop short of vocab_size: pairs seen once are never merged.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer, length=len(texts))
    return Tokenizer("bpe", hf=hf)
