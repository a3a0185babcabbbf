"""Tokenizers: one small `Tokenizer` over three kinds, selected by `data.tokenizer`.

- bpe:  byte-level BPE trained with HuggingFace `tokenizers` (GPT-2 style pre-tokenization),
        saved in HF's own tokenizer.json format, so `tokenizers.Tokenizer.from_file` reads it too.
- char: one token per character of the training corpus; unknown characters are an error.
- byte: one token per byte value 0..255.
- hf:   a ready-made Hugging Face tokenizer (`data.hf_tokenizer`: a tokenizer.json, or a model
        directory holding one): an imported model's, so the study's models share its vocabulary.
        EOT is its tokenizer_config.json's eos_token (else "<|endoftext|>"). Byte-level BPE
        (GPT-2, Pythia, Llama 3, Qwen2, Falcon) and SentencePiece-style BPE with byte fallback
        (Llama 2, Mistral) are supported: bits per byte needs each token's byte length.
Every kind has a special end-of-text token (EOT; `<|endoftext|>` but for hf), which the prepare
stage appends to each document. Inside document text the EOT string is ordinary text, never EOT.

    python -c "from components.tokenizer import Tokenizer; print(Tokenizer.load('data/prepared/tokenizer.json'))"
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
KINDS = ("bpe", "char", "byte", "hf")
CONFIG = "tokenizer_config.json"          # HF's file beside tokenizer.json; its eos_token is the hf kind's EOT


class Tokenizer:
    """encode/decode text, plus what the evaluation needs: eot_id and token_bytes().

    Exactly one backend is set: `hf` for bpe and hf, `chars` (id -> character) for char; byte needs
    none. `config` is the hf kind's tokenizer_config.json (saved beside tokenizer.json).
    """

    def __init__(self, kind: str, hf: HFTokenizer | None = None, chars: list[str] | None = None,
                 config: dict | None = None):
        assert kind in KINDS, kind
        assert (hf is not None) == (kind in ("bpe", "hf")) and (chars is not None) == (kind == "char")
        self.kind, self.hf, self.chars, self.config = kind, hf, chars, config
        if kind in ("bpe", "hf"):
            hf.encode_special_tokens = True   # document text never produces EOT (not saved by HF: set on load)
            self.eot_id = hf.token_to_id(eos_token(config) if kind == "hf" else EOT)
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
        if self.hf is not None:
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
        if self.hf is not None:   # encode_batch_fast (tokenizers >= 0.21): the same ids, ~25% faster, no offsets
            encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """EOT decodes to "<|endoftext|>"; bytes that do not form whole characters decode to U+FFFD."""
        if self.hf is not None:
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
        if self.kind == "hf":
            return hf_token_bytes(self.hf)
        # Byte-level BPE spells every byte as one printable character of a 256-letter alphabet.
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        out = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            assert i == self.eot_id or set(token) <= alphabet, f"token {i} {token!r} is not byte-level"
            out.append(0 if i == self.eot_id else len(token))
        return out

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path` (hf: with its tokenizer_config.json beside it)."""
        if self.kind == "hf":
            Path(path).with_name(CONFIG).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        if self.kind in ("bpe", "hf"):
            text = self.hf.to_str(pretty=True)
        else:
            chars = {"chars": self.chars} if self.kind == "char" else {}
            text = json.dumps({"archflow_tokenizer": self.kind, **chars}, indent=2)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read what save() wrote: our small JSON for char/byte, HF's tokenizer.json for bpe and hf
        (hf: the one with a tokenizer_config.json beside it)."""
        path = Path(path)
        raw = json.loads(path.read_text(encoding="utf-8"))
        kind = raw.get("archflow_tokenizer", "bpe")
        if kind == "bpe":
            hf = HFTokenizer.from_str(json.dumps(raw))
            if path.with_name(CONFIG).exists():
                return cls("hf", hf=hf, config=json.loads(path.with_name(CONFIG).read_text(encoding="utf-8")))
            return cls("bpe", hf=hf)
        return cls(kind, chars=raw.get("chars"))

    def sha256(self) -> str:
        """What identifies the vocabulary: sha256 of the canonical serialisation (bpe, hf: HF's own, so
        two differently formatted copies of one tokenizer.json agree) and the EOT id."""
        text = self.hf.to_str() if self.hf is not None else json.dumps([self.kind, self.chars])
        return hashlib.sha256((text + f"\neot {self.eot_id}").encode("utf-8")).hexdigest()


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, hf_tokenizer: str | None = None) -> Tokenizer:
    """A tokenizer of `kind` for `texts`; vocab_size is used by bpe only (an upper bound there);
    hf reads the one at `hf_tokenizer` (see load_hf) and trains nothing."""
    if kind == "hf":
        return load_hf(hf_tokenizer)
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


# ---------------------------------------------------------------------------------------------
# the hf kind: a ready-made Hugging Face tokenizer


def hf_files(path: str | Path) -> tuple[Path, Path | None]:
    """(tokenizer.json, tokenizer_config.json or None) of a tokenizer.json path or a directory holding one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} is neither a tokenizer.json nor a directory holding one (a Hugging Face "
                                f"model directory has it; sentencepiece-only tokenizer.model files are not read)")
    config = file.with_name(CONFIG)
    return file, config if config.is_file() else None


def eos_token(config: dict | None) -> str:
    """The EOT token's text: tokenizer_config.json's eos_token (a string or {"content": ...}), else <|endoftext|>."""
    eos = (config or {}).get("eos_token") or EOT
    return eos["content"] if isinstance(eos, dict) else eos


def load_hf(path: str | Path) -> Tokenizer:
    """The hf-kind Tokenizer at `path` (see hf_files). Raises ValueError naming the file and the fix when
    it has no EOT token or is not a kind whose byte lengths are known (hf_token_bytes)."""
    file, config_file = hf_files(path)
    hf = HFTokenizer.from_file(str(file))
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file else {}
    config = {**config, "eos_token": eos_token(config)}
    if hf.token_to_id(config["eos_token"]) is None:
        raise ValueError(f"{file}: its end-of-text token {config['eos_token']!r} is not in the vocabulary: name "
                         f"the right one as eos_token in a {CONFIG} beside it")
    hf_token_bytes(hf, str(file))                      # checks the kind now, not at evaluate
    return Tokenizer("hf", hf=hf, config=config)


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")      # SentencePiece's byte fallback: one byte


def hf_token_bytes(hf: HFTokenizer, where: str = "the tokenizer") -> list[int]:
    """UTF-8 byte length of each token (0 for special tokens), for bits per byte. Byte-level BPE: one
    character of its 256-letter alphabet per byte. SentencePiece-style (a Metaspace pre-tokenizer or
    decoder): "\u2581" is a space and <0xNN> one byte; its space before each document's first word
    counts as a byte, though the text has none (+1 byte a document: negligible at a few thousand)."""
    spec = json.loads(hf.to_str())
    kinds = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")])
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    if '"ByteLevel"' in kinds:
        length = len
    elif '"Metaspace"' in kinds or "\u2581" in kinds or "\\u2581" in kinds:
        def length(token: str) -> int:
            return 1 if BYTE_TOKEN.fullmatch(token) else len(token.replace("\u2581", " ").encode("utf-8"))
    else:
        raise ValueError(f"{where} is neither byte-level BPE nor SentencePiece-style (no ByteLevel or Metaspace "
                         f"step): archflow cannot count its tokens' bytes for bits per byte; use data.tokenizer bpe")
    return [0 if i in special else length(hf.id_to_token(i)) for i in range(hf.get_vocab_size(with_added_tokens=True))]
