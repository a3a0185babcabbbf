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


# ---------------------------------------------------------------------------------------------
# hf: a ready-made Hugging Face tokenizer (an imported model's)

def hf_dir(path, tok, eos=None):
    """A model directory's tokenizer files: tokenizer.json, and tokenizer_config.json naming eos."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path / "tokenizer.json")
    if eos is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "tokenizer_class": "X"}))
    return path


def metaspace_tokenizer(tmp_path):
    """A SentencePiece-style BPE (Llama 2, Mistral): "\u2581" for spaces, <0xNN> byte fallback, </s>."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "\u2581",
              *sorted(set("".join(CORPUS)) - {" "}), "\u2581d", "ef", "\u2581def"]
    hf = HF(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[("\u2581", "d"), ("e", "f"), ("\u2581d", "ef")],
                       byte_fallback=True, unk_token="<unk>"))
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    (tmp_path / "sp").mkdir()
    hf.save(str(tmp_path / "sp" / "tokenizer.json"))
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    return tmp_path / "sp"


def test_hf_kind_reads_a_model_directory_and_counts_bytes_exactly(bpe, tmp_path):
    """A byte-level tokenizer.json in a model directory: the same ids as the bpe kind it came from, EOT
    from tokenizer_config.json, every byte counted once, saved and loaded as hf with the same identity."""
    tok = train_tokenizer("hf", [], 0, str(hf_dir(tmp_path / "m", bpe, eos=EOT)))
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("hf", bpe.vocab_size, bpe.eot_id)
    ids = tok.encode(TEXT)
    assert ids == bpe.encode(TEXT) and tok.decode(ids) == TEXT and tok.eot_id not in ids
    assert sum(tok.token_bytes()[i] for i in ids) == len(TEXT.encode("utf-8")) == 63
    assert tok.token_bytes() == bpe.token_bytes()
    (tmp_path / "prepared").mkdir()
    tok.save(tmp_path / "prepared" / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "prepared" / "tokenizer.json")
    assert (again.kind, again.eot_id, again.sha256()) == ("hf", tok.eot_id, tok.sha256())
    assert train_tokenizer("bpe", CORPUS[:2], 300).sha256() != tok.sha256()     # another vocabulary
    # the identity ignores formatting: a compact copy of the same tokenizer.json is the same tokenizer
    compact = tmp_path / "compact"
    compact.mkdir()
    (compact / "tokenizer.json").write_text(json.dumps(json.loads((tmp_path / "m" / "tokenizer.json").read_text())))
    (compact / "tokenizer_config.json").write_text((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert train_tokenizer("hf", [], 0, str(compact)).sha256() == tok.sha256()
    # a tokenizer.json path works as well as its directory
    assert train_tokenizer("hf", [], 0, str(tmp_path / "m" / "tokenizer.json")).sha256() == tok.sha256()


def test_hf_kind_sentencepiece_style_counts_spaces_and_byte_fallback(tmp_path):
    tok = train_tokenizer("hf", [], 0, str(metaspace_tokenizer(tmp_path)))
    assert tok.hf.id_to_token(tok.eot_id) == "</s>"
    text = "def add(a, b):\n    return 2 €"                 # €: not in the vocabulary, so 3 byte-fallback tokens
    ids = tok.encode(text)
    assert [tok.hf.id_to_token(i) for i in ids[-3:]] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.hf.id_to_token(ids[0]) == "\u2581def" and tok.decode(ids) == text
    sizes = tok.token_bytes()
    # the Metaspace pre-tokenizer prepends one "\u2581" to the document: one byte more than the text
    assert sum(sizes[i] for i in ids) == len(text.encode("utf-8")) + 1
    assert sizes[tok.hf.token_to_id("<s>")] == 0 and sizes[tok.hf.token_to_id("<0x0A>")] == 1


def test_hf_kind_refuses_what_it_cannot_use(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a tokenizer.json nor a directory holding one"):
        train_tokenizer("hf", [], 0, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"end-of-text token '</s>' is not in the vocabulary: name the right one"):
        train_tokenizer("hf", [], 0, str(hf_dir(tmp_path / "m", bpe, eos="</s>")))
    from tokenizers import Tokenizer as HF, models, pre_tokenizers
    wordpiece = HF(models.WordPiece({"[UNK]": 0, "<|endoftext|>": 1, "a": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "wp").mkdir()
    wordpiece.save(str(tmp_path / "wp" / "tokenizer.json"))
    with pytest.raises(ValueError, match="neither byte-level BPE nor SentencePiece-style.*use data.tokenizer bpe"):
        train_tokenizer("hf", [], 0, str(tmp_path / "wp"))
