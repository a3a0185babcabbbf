"""Hugging Face checkpoints <-> archflow (components/hf.py), checked against transformers itself on
tiny random models: an imported HF model of each mapped family gives the same logits (max abs
diff <= 1e-4 in fp32) and the same greedy tokens; the state dict goes back to the original tensors
exactly; archflow models of each mappable preset, exported, load in transformers with no custom
code and give the same logits and tokens; configs and models with no exact equivalent are refused
by name.

    .venv/bin/python -m pytest tests/components/test_hf.py -q
"""
import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from components.compress import importance, keep_by_score, prune, quantize  # noqa: E402
from components.config import ModelConfig  # noqa: E402
from components.errors import ParamsError  # noqa: E402
from components.hf import (  # noqa: E402
    config_from_hf,
    dequantized_state,
    falcon_kv_heads,
    grouped_to_qkv,
    hf_config,
    hf_family,
    hf_norm_biases,
    qkv_to_grouped,
    state_from_hf,
    state_to_hf,
    weights_problem,
)
from components.model import TransformerLM  # noqa: E402
from components.params import compress_shape_problems  # noqa: E402
from components.upcycle import upcycle_state_dict, upcycled_config  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

V = 64
SIZE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24)

# tiny HF models of each mapped family and layout: model_type, config overrides, the archflow block
HF_CASES = {
    "llama-gqa": ("llama", dict(intermediate_size=48, num_key_value_heads=2, rope_theta=500.0), "serial"),
    "llama-bias-tied": ("llama", dict(intermediate_size=48, attention_bias=True, mlp_bias=True,
                                      tie_word_embeddings=True), "serial"),
    "mistral-mqa": ("mistral", dict(intermediate_size=48, num_key_value_heads=1, sliding_window=None), "serial"),
    "qwen2-gqa": ("qwen2", dict(intermediate_size=48, num_key_value_heads=2, rope_theta=1e6), "serial"),
    "gpt_neox-pythia": ("gpt_neox", dict(intermediate_size=64, rotary_pct=0.25), "parallel-2norm"),
    "gpt_neox-serial": ("gpt_neox", dict(intermediate_size=64, rotary_pct=0.5, use_parallel_residual=False), "serial"),
    "falcon-7b-mqa": ("falcon", dict(), "parallel"),
    "falcon-mha-bias": ("falcon", dict(multi_query=False, bias=True, tie_word_embeddings=False), "parallel"),
    "falcon-gqa-one-norm": ("falcon", dict(num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=1),
                            "parallel"),
    "falcon-40b-two-norms": ("falcon", dict(num_kv_heads=2, new_decoder_architecture=True), "parallel-2norm"),
    "falcon-serial": ("falcon", dict(parallel_attn=False), "serial"),
}


def hf_model(name: str):
    """(a random HF model of the case, with noise on every weight (norms and biases not at their init),
    its config as config.json has it: building a Falcon model fills in num_ln_in_parallel_attn)."""
    kind, overrides, _ = HF_CASES[name]
    config = transformers.AutoConfig.for_model(kind, **SIZE, **overrides)
    saved = config.to_dict()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model, saved


def imported(hf, saved: dict) -> TransformerLM:
    cfg = config_from_hf(saved)
    model = TransformerLM(cfg)
    model.load_state_dict(state_from_hf(cfg, hf.config.model_type, hf.state_dict()), strict=not cfg.tie_embeddings)
    return model.eval()


@torch.no_grad()
def assert_same_lm(ours: TransformerLM, hf, max_diff: float = 1e-4) -> float:
    """Same logits (max abs diff <= max_diff) and the same greedy continuation, cached on both sides."""
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= max_diff
    theirs = hf.generate(idx[:, :4], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(idx[:, :4], 12, temperature=0), theirs)
    return diff


@pytest.mark.parametrize("name", HF_CASES)
def test_imported_model_matches_transformers(name):
    hf, saved = hf_model(name)
    ours = imported(hf, saved)
    assert ours.cfg.block == HF_CASES[name][2]
    assert ours.num_params() == hf.num_parameters()
    assert_same_lm(ours, hf)


@pytest.mark.parametrize("name", HF_CASES)
def test_import_then_export_gives_back_the_original_tensors(name):
    hf, saved = hf_model(name)
    ours = imported(hf, saved)
    kind = hf_family(ours.cfg, prefer=hf.config.model_type)
    assert kind == hf.config.model_type
    back = state_to_hf(ours.cfg, kind, ours.state_dict())
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    original = {k: v for k, v in hf.state_dict().items() if k not in tied}
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)
    # every field export writes is the original's, but the token ids (--tokenizer sets them) and, for
    # Falcon, multi_query and num_kv_heads where transformers ignores one of them (compared by effect)
    config, original = hf_config(ours.cfg, kind), saved
    ignored = ["architectures", "torch_dtype", "bos_token_id", "eos_token_id", "multi_query", "num_kv_heads"]
    assert [k for k, v in config.items() if v != original.get(k) and k not in ignored] == []
    if kind == "falcon":
        assert falcon_kv_heads(config) == falcon_kv_heads(original) == ours.cfg.n_kv_head


# archflow models of each mappable preset (config overrides of a tiny model) -> the HF family they export to
TINY = dict(vocab_size=V, block_size=24, n_layer=2, n_head=4, n_embd=32, pos="rope")
EXPORT_CASES = {
    "serial-llama": (dict(block="serial", norm="rmsnorm", ffn="swiglu", n_kv_head=2, tie_embeddings=False), "llama"),
    "serial-llama-bias-tied": (dict(block="serial", norm="rmsnorm", ffn="swiglu", bias=True), "llama"),
    "serial-qwen2": (dict(block="serial", norm="rmsnorm", ffn="swiglu", qkv_bias=True, n_kv_head=2), "qwen2"),
    "serial-layernorm-gelu-bias": (dict(block="serial", bias=True, rotary_pct=0.5), "gpt_neox"),
    "serial-layernorm-gelu-mqa": (dict(block="serial", n_kv_head=1), "falcon"),
    "parallel-2norm-neox": (dict(block="parallel-2norm", bias=True, rotary_pct=0.25, tie_embeddings=False), "gpt_neox"),
    "parallel-2norm-gqa": (dict(block="parallel-2norm", n_kv_head=2), "falcon"),
    "parallel-mqa": (dict(block="parallel", n_kv_head=1), "falcon"),
    "parallel-mha-bias": (dict(block="parallel", bias=True), "falcon"),
    "parallel-gqa-norm-bias": (dict(block="parallel", n_kv_head=2, norm_bias=True), "falcon"),
    "parallel-unfused": (dict(block="parallel-unfused", n_kv_head=1), "falcon"),
}


def archflow_model(overrides: dict) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**TINY, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def exported(model: TransformerLM, tmp_path, sd: dict | None = None, cfg: ModelConfig | None = None):
    """Write the HF directory of model (or of cfg, sd) and load it with plain transformers."""
    cfg, sd = cfg or model.cfg, sd if sd is not None else model.state_dict()
    kind = hf_family(cfg)
    tensors = state_to_hf(cfg, kind, sd) | {n: torch.zeros(cfg.n_embd) for n in hf_norm_biases(cfg, kind)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, kind)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tied = {"lm_head.weight", "embed_out.weight"} if cfg.tie_embeddings else set()
    assert set(hf.state_dict()) - tied == set(tensors)        # every weight from the file, none left to init
    return kind, hf


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_exported_model_matches_archflow(name, tmp_path):
    overrides, family = EXPORT_CASES[name]
    ours = archflow_model(overrides)
    kind, hf = exported(ours, tmp_path)
    assert kind == family and type(hf).__name__ == hf_config(ours.cfg, kind)["architectures"][0]
    assert hf.num_parameters() == ours.num_params() + len(hf_norm_biases(ours.cfg, kind)) * ours.cfg.n_embd
    assert_same_lm(ours, hf)


def test_int8_model_is_exported_dequantised(tmp_path):
    ours = quantize(archflow_model(EXPORT_CASES["serial-llama"][0]), embeddings=True)
    cfg = ModelConfig(**{**ours.cfg.to_dict(), "quant": "", "quant_embeddings": False})
    _, hf = exported(ours, tmp_path, dequantized_state(ours.state_dict()), cfg)
    assert_same_lm(ours, hf)


def test_fused_qkv_regrouping_is_a_permutation_and_its_inverse():
    for n_head, n_kv_head in ((4, 4), (4, 2), (4, 1)):
        rows = torch.arange((n_head + 2 * n_kv_head) * 3).float()       # head size 3
        grouped = qkv_to_grouped(rows, n_head, n_kv_head)
        assert sorted(grouped.tolist()) == rows.tolist()
        assert torch.equal(grouped_to_qkv(grouped, n_head, n_kv_head), rows)
    # archflow's [q0 q1 q2 q3 k0 k1 v0 v1] -> per kv group [q0 q1 k0 v0 | q2 q3 k1 v1] (head size 1);
    # GPT-NeoX (4 kv heads): [q0 k0 v0 | q1 k1 v1 | ...]
    assert qkv_to_grouped(torch.arange(8.0), 4, 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert qkv_to_grouped(torch.arange(12.0), 4, 4).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


# HF configs archflow cannot compute exactly: (model_type, overrides, words the message must name)
BAD_HF = {
    "sliding-window": ("mistral", dict(intermediate_size=48, sliding_window=8), ["sliding_window=8"]),
    "rope-scaling": ("llama", dict(intermediate_size=48, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                     ["rope_scaling"]),
    "alibi": ("falcon", dict(alibi=True), ["alibi"]),
    "tanh-gelu": ("gpt_neox", dict(intermediate_size=64, hidden_act="gelu_new"), ["hidden_act='gelu_new'"]),
    "odd-rotary": ("gpt_neox", dict(intermediate_size=64, rotary_pct=0.4), ["rotary_pct=0.4"]),
    "head-dim": ("llama", dict(intermediate_size=48, head_dim=16), ["head_dim=16"]),
    "mixed-bias": ("llama", dict(intermediate_size=48, attention_bias=True), ["attention_bias=True", "mlp_bias"]),
    "two-at-once": ("falcon", dict(alibi=True, activation="relu"), ["alibi", "activation='relu'"]),
    "moe": ("mixtral", dict(intermediate_size=48), ["model_type='mixtral'", "upcycle"]),
    "qwen2-sliding-layers": ("qwen2", dict(intermediate_size=48, use_sliding_window=True, sliding_window=32,
                                           max_window_layers=1), ["layer_types=", "sliding"]),
    "gpt-j": ("gptj", dict(), ["model_type='gptj'", "gelu_new"]),
}


@pytest.mark.parametrize("name", BAD_HF)
def test_hf_configs_without_an_exact_mapping_are_refused_by_name(name):
    kind, overrides, words = BAD_HF[name]
    hf = transformers.AutoConfig.for_model(kind, **SIZE, **overrides).to_dict()
    with pytest.raises(ParamsError) as e:
        config_from_hf(hf)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_unknown_model_type_is_refused():
    with pytest.raises(ParamsError, match="model_type='t5-ish'.*imports llama, mistral, qwen2, gpt_neox, falcon"):
        config_from_hf({"model_type": "t5-ish"})


# archflow models with no HF equivalent: overrides -> words the message must name
BAD_EXPORT = {
    "par": (dict(block="par"), ["block='par'"]),
    "one-wide-ffn": (dict(block="one-wide-ffn"), ["block='one-wide-ffn'"]),
    "hybrid": (dict(block="hybrid"), ["block='hybrid'"]),
    "denseformer": (dict(dwa=True), ["dwa"]),
    "looped": (dict(n_loop=2), ["n_loop=2"]),
    "moe": (dict(n_expert=2), ["n_expert=2", "MoE"]),
    "moa": (dict(block="parallel", n_attn_expert=2), ["n_attn_expert=2"]),
    "pruned": (dict(layer_n_head=[4, 2], layer_n_kv_head=[4, 2], layer_d_ff=[64, 32]), ["per-layer widths"]),
    "learned-positions": (dict(pos="learned"), ["pos='learned'"]),
    "serial-layernorm-swiglu": (dict(ffn="swiglu"), ["llama: ", "norm='layernorm'", "gpt_neox: ", "ffn='swiglu'"]),
    "partial-rotary-parallel": (dict(block="parallel", rotary_pct=0.5), ["falcon: ", "rotary_pct=0.5"]),
}


@pytest.mark.parametrize("name", BAD_EXPORT)
def test_models_without_an_hf_equivalent_are_refused_by_name(name):
    overrides, words = BAD_EXPORT[name]
    cfg = ModelConfig(**{**TINY, **overrides})
    with pytest.raises(ParamsError) as e:
        hf_family(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_new_config_fields_are_checked():
    for bad, words in ((dict(rotary_pct=0.5, pos="learned"), "only read with pos: rope"),
                       (dict(rotary_pct=0.4), "even and >= 2"), (dict(rotary_pct=0.0), "must be in (0, 1]"),
                       (dict(norm_bias=True, norm="rmsnorm"), "norm_bias is only read"),
                       (dict(qkv_bias=True, bias=True), "qkv_bias is only read"),
                       (dict(qkv_bias=True, block="parallel"), "qkv_bias is only read"),
                       (dict(norm_bias=True, bias=True), "norm_bias is only read")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
            ModelConfig(**{**TINY, **bad})


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa", "falcon-7b-mqa"])
def test_imported_models_take_the_upcycle_and_compress_transforms(name):
    """An MoE sparse-upcycled from an import reproduces it (identical experts); pruning and int8 run;
    FFN Fusion of a Falcon import (layernorm shift, no FFN bias) is refused by name."""
    ours = imported(*hf_model(name))
    cfg = upcycled_config(ours.cfg, "sparse", 4, top_k=2)
    moe = TransformerLM(cfg)
    moe.load_state_dict(upcycle_state_dict(cfg, ours.cfg, [ours.state_dict()], [0] * 4, 7, "random", 0.0))
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(moe.eval()(idx), ours(idx), atol=1e-5)
        prune(ours, *keep_by_score(importance(ours, "magnitude", []), 0.3))(idx)
        quantize(ours, embeddings=False)(idx)
    fusion = compress_shape_problems(ours.cfg, "ffn_fusion")
    assert (fusion == []) == (name != "falcon-7b-mqa") and all("norm_bias" in p for p in fusion)


def test_weights_problem_names_the_files_and_the_fix():
    """safetensors (whole or sharded) are read; pickles are refused by name, with the conversion; no
    weights at all says what to give. Only file names are looked at."""
    assert weights_problem({"config.json", "model.safetensors"}) is None
    assert weights_problem({"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"}) is None
    assert weights_problem({"config.json", "model.safetensors", "pytorch_model.bin"}) is None   # read: safetensors
    problem = weights_problem({"config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"})
    assert problem.startswith("has PyTorch pickle weights (pytorch_model-00001-of-00002.bin, pytorch_model.bin."
                              "index.json) and no model.safetensors") and "save_pretrained(dir)" in problem
    assert "(consolidated.00.pth)" in weights_problem({"params.json", "consolidated.00.pth"})
    assert weights_problem({"config.json", "tf_model.h5"}).startswith("has no weights (no model.safetensors")
