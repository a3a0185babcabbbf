"""import@<name> in a study: the params-driven import stage on tiny random Hugging Face checkpoints that
carry a tokenizer. The study's tokenizer (data.tokenizer hf) is the checkpoint's; the imported model's
logits match transformers', its lineage names the source, and the stages after it take it. Every bad
input is one message before anything is written: another tokenizer, too small an embedding, an
unmappable config, a missing directory (with the download command), a study tokenizer changed later.

    .venv/bin/python -m pytest tests/tasks/test_import_stage.py -q
"""
import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from components.artifacts import load_input, load_model_dir, prepared_meta  # noqa: E402
from components.errors import ParamsError  # noqa: E402
from components.params import load_study  # noqa: E402
from components.tokenizer import train_tokenizer  # noqa: E402
from tasks import evaluate, hf_import, prepare, validate  # noqa: E402
from tests.tasks.tiny_corpus import write_corpus  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

PARAMS = """\
study: {{name: tiny, seed: 7}}
data: {{source: corpus, include: ["*.txt"], tokenizer: hf, hf_tokenizer: {tokenizer}, val_fraction: 0.1}}
model: {{block_size: 32, n_layer: 1, n_head: 2, n_embd: 16}}
pretrain: {{variants: {{scratch: {{preset: serial}}}}}}
import:
{imports}
evaluate: {{max_tokens: 256, prompt_tokens: 8, decode_tokens: 4, speed_warmup: 0, speed_runs: 1}}
"""
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32)


def hf_checkpoint(path, tokenizer, kind="llama", vocab_size=None, dtype=torch.float32, **overrides):
    """A random HF model of family `kind` saved at path in `dtype` with `tokenizer` (its tokenizer.json
    and a tokenizer_config.json naming EOT), as a downloaded checkpoint looks."""
    config = transformers.AutoConfig.for_model(kind, vocab_size=vocab_size or tokenizer.vocab_size,
                                               **{**LLAMA, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A tiny corpus, a bpe tokenizer of it in hf/llama (with a random Llama), the study prepared with it."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path)
    tokenizer = train_tokenizer("bpe", [p.read_text() for p in sorted((tmp_path / "corpus").glob("*.txt"))], 300)
    hf_checkpoint(tmp_path / "hf/llama", tokenizer, dtype=torch.bfloat16)
    write(tmp_path, "hf/llama", "  llama: {path: hf/llama, hf: meta-llama/tiny-random, revision: " + "ab" * 20 + "}")
    prepare.main([])
    return tmp_path, tokenizer


def write(root, tokenizer: str, imports: str):
    (root / "params.yaml").write_text(PARAMS.format(tokenizer=tokenizer, imports=imports))


def test_import_stage_writes_a_model_the_study_scores_on_its_tokens(study):
    root, tokenizer = study
    assert prepared_meta()["vocab_size"] == tokenizer.vocab_size
    hf_import.main(["llama"])
    model, meta = load_model_dir(root / "models/llama")
    assert meta["source"] == {"path": "hf/llama", "model_type": "llama", "dtype": "bfloat16",
                              "name_or_path": "meta-llama/tiny-random",
                              "revision": "ab" * 20}
    assert meta["tokenizer_sha256"] == prepared_meta()["tokenizer_sha256"] and meta["steps"] == 0
    # stored in bfloat16, computed in float32: the same logits as transformers' float32 model of those weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf/llama", dtype=torch.float32).eval()
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    timing = json.loads((root / "metrics/train/llama.json").read_text())
    assert timing["train_seconds"] == 0 and timing["import_seconds"] > 0
    evaluate.main(["llama"])                                     # scored on the study's tokens
    metrics = json.loads((root / "metrics/llama.json").read_text())
    assert metrics["train_tokens"] == 0 and 0 < metrics["val_loss"] < 20


def test_another_tokenizer_or_too_small_an_embedding_is_refused_before_writing(study):
    root, tokenizer = study
    other = train_tokenizer("bpe", [(root / "corpus/doc0.txt").read_text()], 280)
    hf_checkpoint(root / "hf/other", other)
    hf_checkpoint(root / "hf/small", tokenizer, vocab_size=tokenizer.vocab_size - 8)
    write(root, "hf/llama", "  other: {path: hf/other}\n  small: {path: hf/small}")
    with pytest.raises(ParamsError, match=r"import.other: its tokenizer \(hf/other/tokenizer.json, \d+ tokens\) is not "
                                          r"the study's \(data.hf_tokenizer hf/llama, 290 tokens\): set data.hf_tok"):
        hf_import.main(["other"])
    with pytest.raises(ParamsError, match=r"import.small: its embedding has 282 rows but the study's tokenizer .* has "
                                          r"290 tokens"):
        hf_import.main(["small"])
    assert not (root / "models").exists() and not (root / "metrics").exists()


def test_an_unmappable_config_or_a_missing_directory_is_one_message(study):
    root, tokenizer = study
    hf_checkpoint(root / "hf/window", tokenizer, kind="mistral", sliding_window=8)
    write(root, "hf/llama", "  window: {path: hf/window}\n  gone: {path: hf/gone, hf: org/gone, revision: v1}")
    with pytest.raises(ParamsError, match=r"(?s)import.window: this Hugging Face checkpoint cannot be imported exactly"
                                          r".*sliding_window=8"):
        hf_import.main(["window"])
    fetch = "download it with `huggingface-cli download org/gone --revision v1 --local-dir hf/gone`"
    with pytest.raises(ParamsError, match="import.gone.path: hf/gone has no config.json: " + fetch):
        hf_import.main(["gone"])                                # import@ says the same, should it run alone
    with pytest.raises(ParamsError, match=r"import.gone.path: hf/gone has no config.json: " + fetch):
        validate.main([])                                       # the validate stage says it before any other
    assert not (root / "models").exists()


def test_a_study_whose_tokenizer_changed_refuses_the_old_import(study):
    root, _ = study
    hf_import.main(["llama"])
    other = train_tokenizer("bpe", [(root / "corpus/doc0.txt").read_text()], 280)
    (root / "tok").mkdir()
    other.save(root / "tok/tokenizer.json")
    write(root, "tok", "  llama: {path: hf/llama}")
    prepare.main([])
    with pytest.raises(ParamsError, match=r"evaluate@llama: the model 'llama' was imported with another tokenizer than "
                                          r"data/prepared's \(data.hf_tokenizer tok\): rebuild it with `dvc repro "
                                          r"import@llama`"):
        evaluate.main(["llama"])
    with pytest.raises(ParamsError, match="was imported with another tokenizer"):
        load_input(load_study(), "llama", prepared_meta(), "distill.kd.teacher", "teacher")
    assert not (root / "metrics/llama.json").exists()


def test_imports_need_the_hf_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("pretrain: {variants: {a: {}}}\nimport: {m: {path: hf/m}}\n"
                                          "data: {hf_tokenizer: hf/m}\n")
    with pytest.raises(ParamsError) as e:
        load_study()
    assert "data.hf_tokenizer: it is read only with data.tokenizer hf" in str(e.value)
    assert "import.m: an imported model reads its own tokenizer's token ids, but data.tokenizer is bpe: set " \
           "data.tokenizer: hf and data.hf_tokenizer: hf/m" in str(e.value)
