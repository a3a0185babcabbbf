"""Tokenizer kinds against their definitions: round trip, bytes per token, determinism, EOT.

    .venv/bin/python -m pytest tests/components/test_tokenizer.py -q
"""
import json

import pytest

from components.tokenizer import EOT, Tokenizer, train_tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 8,
    "# Grüße, naïve café — 日本語 🐍\r\nclass Point:\n    x: float = 0.0\n    y: float = 0.0\n" * 8,
    "for i in range(10):\n\tif i % 2:\n\t\tprint('odd', i)\n" * 8,
]
TEXT = "def grüße(x):  # 日本語 🐍\r\n\treturn x * 2 <|endoftext|>\n"   # unseen words, non-ASCII, literal EOT


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", CORPUS, 300)


def tokenizers(bpe):
    return {"bpe": bpe, "char": train_tokenizer("char", CORPUS + [TEXT], 300), "byte": train_tokenizer("byte", [], 300)}


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_round_trip_and_bytes_per_token(bpe, kind, tmp_path):
    tok = tokenizers(bpe)[kind]
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    sizes = tok.token_bytes()
    assert len(sizes) == tok.vocab_size
    assert sum(sizes[i] for i in ids) == len(TEXT.encode("utf-8")) == 63
    assert tok.eot_id not in ids                  # the literal string in a document is plain text
    assert sizes[tok.eot_id] == 0
    assert tok.decode(ids + [tok.eot_id]) == TEXT + EOT
    assert tok.encode_batch([TEXT, "x"]) == [ids, tok.encode("x")]
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (kind, tok.vocab_size, tok.eot_id)
    assert loaded.encode(TEXT) == ids
    assert loaded.token_bytes() == sizes


def test_bpe_vocabulary(bpe):
    assert repr(bpe) == "Tokenizer('bpe', vocab_size=300, eot_id=0)"
    assert bpe.vocab_size == 300                  # 256 bytes + EOT + 43 merges: the corpus has enough pairs
    assert bpe.eot_id == 0 and bpe.hf.id_to_token(0) == EOT
    assert len(bpe.encode(CORPUS[0])) == 240               # of 408 bytes: merges compress
    sizes = bpe.token_bytes()
    assert sizes[bpe.hf.token_to_id("Ġfloat")] == 6        # a frequent word merged whole, with its space
    assert sizes[bpe.hf.token_to_id("naÃ")] == 3           # "na" + the first byte of "ï": bytes, not characters


def test_bpe_training_is_deterministic(bpe, tmp_path):
    bpe.save(tmp_path / "a.json")
    train_tokenizer("bpe", CORPUS, 300).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text())["model"]["type"] == "BPE"   # HF's own format


def test_char_vocabulary_and_unknown_character():
    tok = train_tokenizer("char", ["ba", "cé"], 300)
    assert tok.chars == ["a", "b", "c", "é"] and tok.eot_id == 4 and tok.vocab_size == 5
    assert tok.encode("abcé") == [0, 1, 2, 3]
    assert tok.token_bytes() == [1, 1, 1, 2, 0]
    with pytest.raises(ValueError, match=r"character 'z' is not in this char tokenizer's vocabulary"):
        tok.encode("abz")


def test_byte_vocabulary(tmp_path):
    tok = train_tokenizer("byte", ["ignored"], 300)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21]
    tok.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == {"archflow_tokenizer": "byte"}


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        train_tokenizer("wordpiece", ["x"], 300)
