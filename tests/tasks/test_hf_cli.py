"""python -m tasks.hf_import and python -m tasks.export on tiny random models: a saved HF directory
imports to a model directory that load_model_dir reads, with the same logits as transformers and its
source in meta.json; exporting it gives back the original files' tensors and config; bfloat16 and
float16 checkpoints import their exact values upcast to float32, sharded ones import, pickle-only and
weightless directories are refused before anything is written; an archflow model with a bpe tokenizer
exports to a directory whose AutoTokenizer encodes as archflow's does; bad configs are refused before
any weight is read, and models with no HF form by name.

    .venv/bin/python -m pytest tests/tasks/test_hf_cli.py -q
"""
import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from components.artifacts import load_model_dir, save_model_dir, short_hash  # noqa: E402
from components.compress import quantize  # noqa: E402
from components.config import ModelConfig  # noqa: E402
from components.errors import ParamsError  # noqa: E402
from components.flops import training_flops_per_token  # noqa: E402
from components.hf import state_from_hf  # noqa: E402
from components.model import TransformerLM  # noqa: E402
from components.tokenizer import train_tokenizer  # noqa: E402
from tasks import export, hf_import  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

PYTHIA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=24, rotary_pct=0.25)


def saved_hf_model(path, kind="gpt_neox", dtype=torch.float32, save=None, **overrides):
    """A random HF model (noise on every weight), saved to path in `dtype` with save_pretrained's
    options `save`; returned as built (float32)."""
    config = transformers.AutoConfig.for_model(kind, **{**PYTHIA, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(path, **(save or {}))
    return model.float()


def test_import_then_export_round_trip(tmp_path):
    # as the Hugging Face cache holds a download: snapshots/<commit>/, config.json naming the repository
    src = tmp_path / "hub" / "snapshots" / ("0123abcd" * 5)
    hf = saved_hf_model(src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "_name_or_path": "EleutherAI/pythia-tiny-random"}))
    hf_import.main([str(src), str(tmp_path / "models" / "pythia")])
    model, meta = load_model_dir(tmp_path / "models" / "pythia")
    assert model.cfg.block == "parallel-2norm" and model.cfg.rotary_pct == 0.25
    source = {"path": str(src), "model_type": "gpt_neox", "dtype": "float32",
              "name_or_path": "EleutherAI/pythia-tiny-random", "revision": "0123abcd" * 5}
    assert meta == {"stage": "import", "method": "hf", "parents": [], "source": source, "params": hf.num_parameters(),
                    "tokens_seen": 0, "steps": 0, "params_hash": short_hash({"stage": "import", "source": source,
                                                                 "model": model.cfg.to_dict()}),
                    "flops_per_token": training_flops_per_token(model), "train_flops": 0, "total_train_flops": 0}
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4

    export.main([str(tmp_path / "models" / "pythia"), str(tmp_path / "out")])
    original, back = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["rotary_pct"] == 0.25
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, hf(idx).logits)


def hf_reference(path):
    """The checkpoint at path as transformers loads it in float32: the logits an import must give."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_half_precision_checkpoint_imports_its_exact_values(tmp_path, kind, dtype):
    """A bf16/fp16 checkpoint (as most on the Hub are): the imported float32 weights are the stored
    values upcast, bit for bit; the logits are transformers' of the same checkpoint read in float32;
    meta.json names the stored dtype; exporting writes those float32 values."""
    saved_hf_model(tmp_path / "hf", kind, dtype=dtype, intermediate_size=48 if kind == "llama" else 64)
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {dtype}
    hf_import.main([str(tmp_path / "hf"), str(tmp_path / "model")])
    model, meta = load_model_dir(tmp_path / "model")
    name = str(dtype).removeprefix("torch.")
    assert meta["source"]["dtype"] == name and name in ("bfloat16", "float16")
    upcast = state_from_hf(model.cfg, kind, {k: t.float() for k, t in stored.items()})
    ours = model.state_dict()
    assert upcast.keys() <= ours.keys() and all(ours[k].dtype == torch.float32 for k in upcast)
    assert all(torch.equal(ours[k], upcast[k]) for k in upcast)
    assert torch.equal(ours["wte.weight"], ours["wte.weight"].to(dtype).float())     # representable in dtype
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf_reference(tmp_path / "hf")(idx).logits).abs().max().item() <= 1e-4

    export.main([str(tmp_path / "model"), str(tmp_path / "out")])
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k].float()) for k in back)


def test_sharded_checkpoint_imports(tmp_path):
    """save_pretrained with a small max_shard_size: model.safetensors.index.json and several shards."""
    saved_hf_model(tmp_path / "hf", "llama", save=dict(max_shard_size="10KB"), intermediate_size=48)
    shards = sorted(f.name for f in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"].values()) \
        == set(shards)
    hf_import.main([str(tmp_path / "hf"), str(tmp_path / "model")])
    model, meta = load_model_dir(tmp_path / "model")
    assert model.cfg.block == "serial" and meta["source"]["dtype"] == "float32"
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf_reference(tmp_path / "hf")(idx).logits).abs().max().item() <= 1e-4


def test_pickle_only_and_weightless_directories_are_refused_before_writing(tmp_path):
    """pytorch_model.bin alone (transformers would unpickle it): refused, naming the conversion;
    config.json with no weights at all: refused, naming what to give. Nothing written either way."""
    saved_hf_model(tmp_path / "bin", save=dict(safe_serialization=False))
    assert "pytorch_model.bin" in {f.name for f in (tmp_path / "bin").iterdir()}
    with pytest.raises(ParamsError) as e:
        hf_import.main([str(tmp_path / "bin"), str(tmp_path / "out")])
    assert "pickle weights (pytorch_model.bin)" in str(e.value) and "save_pretrained(dir) writes model.safetensors" \
        in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "bin" / "config.json").read_text())
    with pytest.raises(ParamsError, match=r"has no weights \(no model.safetensors, nor a model.safetensors.index.json"):
        hf_import.main([str(tmp_path / "empty"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_bad_config_is_refused_before_reading_weights(tmp_path):
    """A config with two problems, beside a weights file that is not safetensors: one message naming
    both (not the damaged weights), nothing written."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        transformers.AutoConfig.for_model("falcon", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, alibi=True, activation="relu").to_dict()))
    (tmp_path / "hf" / "model.safetensors").write_text("not weights")
    with pytest.raises(ParamsError) as e:
        hf_import.main([str(tmp_path / "hf"), str(tmp_path / "out")])
    assert "alibi=true" in str(e.value) and "activation='relu'" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_and_missing_config_are_refused(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ParamsError, match="model_type='t5'"):
        hf_import.main([str(tmp_path / "t5"), str(tmp_path / "out")])
    with pytest.raises(ParamsError, match="has no config.json"):
        hf_import.main([str(tmp_path / "nothing"), str(tmp_path / "out")])


def archflow_dir(path, **overrides):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**{**dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32,
                                                 pos="rope"), **overrides})).eval()
    save_model_dir(path, model, {"stage": "pretrain", "parents": []})
    return model


def test_export_with_a_bpe_tokenizer(tmp_path):
    texts = ["def main():\n    return 42\n", "import os\nprint(os.getcwd())\n"] * 20
    tok = train_tokenizer("bpe", texts, 300)
    tok.save(tmp_path / "tokenizer.json")
    model = archflow_dir(tmp_path / "model", vocab_size=tok.vocab_size, norm="rmsnorm", ffn="swiglu")
    export.main([str(tmp_path / "model"), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer.json")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    text = "def main():\n    print(42)\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text) and hf_tok.eos_token_id == tok.eot_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert hf.config.model_type == "llama" and hf.config.eos_token_id == tok.eot_id
    idx = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_export_refuses_char_tokenizers_and_models_without_hf_form(tmp_path):
    tok = train_tokenizer("char", ["abc"], 0)
    tok.save(tmp_path / "tokenizer.json")
    archflow_dir(tmp_path / "serial", vocab_size=tok.vocab_size, norm="rmsnorm", ffn="swiglu")
    with pytest.raises(ParamsError, match="char tokenizer, which has no Hugging Face form"):
        export.main([str(tmp_path / "serial"), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer.json")])
    archflow_dir(tmp_path / "par", block="par")
    with pytest.raises(ParamsError, match="block='par' has no Hugging Face equivalent"):
        export.main([str(tmp_path / "par"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_int8_model_exports_dequantised(tmp_path):
    model = archflow_dir(tmp_path / "float", block="parallel", n_kv_head=1)
    q = quantize(model, embeddings=False)
    save_model_dir(tmp_path / "int8", q, {"stage": "compress", "parents": ["float"]})
    export.main([str(tmp_path / "int8"), str(tmp_path / "out")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert hf.config.model_type == "falcon"             # its layernorm biases written as zeros, not left to init
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(hf.state_dict()) - {"lm_head.weight"}
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (q(idx) - hf(idx).logits).abs().max().item() <= 1e-4
