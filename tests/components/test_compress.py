"""Pins components/compress.py and components/quant.py against references: int8 round trip within
s/2 per channel, a 0% prune and an attention drop of no layer are the source, pruned and dropped
parameter counts follow the width formula, a dropped attention equals a zeroed one, a fused run
equals its parallel formulation (and the block-parallel run of the same FFN-only layers), block-
parallel runs sum their blocks on one input, compressed models save, load and decode. Tiny CPU configs.

    .venv/bin/python -m pytest tests/components/test_compress.py -q
"""
import copy

import pytest
import torch
from safetensors.torch import load_file

from components import quant
from components.artifacts import load_model_dir, save_model_dir
from components.compress import (drop_attention, fuse_ffns, importance, keep_by_score, layer_linears, parallel_blocks,
                                  prune, quantize, search_drops, search_runs)
from components.config import PRESETS, ModelConfig
from components.errors import ParamsError
from components.hf import hf_family
from components.model import TransformerLM, lm_loss
from components.params import attention_layer_problems, fusion_run_problems, teacher_init_problems
from components.params import compress_shape_problems as shape_problems

torch.set_num_threads(1)

TINY = dict(vocab_size=64, block_size=24, n_layer=3, n_head=4, n_embd=32)


def model(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    m = TransformerLM(ModelConfig(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                       # non-trivial norms and biases, spread-out logits
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def tokens(B=2, T=12, seed=0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def batches(n=2, seed=0):
    return [(tokens(seed=seed + i), tokens(seed=seed + 100 + i)) for i in range(n)]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_round_trip_is_within_half_a_step_per_channel():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 48)[:, None]
    w[5] = 0.0                                                  # an all-zero channel stays exact
    q, s = quant.quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() == 127
    err = (w - q.float() * s[:, None]).abs().amax(dim=1)
    assert (err <= s / 2 * (1 + 1e-6)).all()
    assert err[5] == 0


@pytest.mark.parametrize("path", [p for p in quant.PATHS if p != "int8_mm" or hasattr(torch, "_weight_int8pack_mm")])
def test_int8_linear_computes_x_times_dequantised_weights(path, monkeypatch):
    monkeypatch.setattr(quant, "_path", path)
    lin = torch.nn.Linear(32, 24, bias=True)
    q = quant.Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 32)
    assert max_diff(q(x), x @ q.weight.T + lin.bias) < 1e-5
    assert max_diff(q(x), lin(x)) < 0.05                       # and stays near the float layer


@pytest.mark.parametrize("embeddings,tie", [(False, True), (True, True), (True, False)])
def test_int8_model_saves_int8_and_loads_alone(tmp_path, embeddings, tie):
    src = model(ffn="swiglu", norm="rmsnorm", pos="rope", tie_embeddings=tie)
    q8 = quantize(src, embeddings)
    assert q8.cfg.quant == "int8" and q8.num_params() == src.num_params()
    x = tokens()
    assert max_diff(q8(x), src(x)) < 0.1 * src(x).abs().max()   # close, not equal
    save_model_dir(tmp_path / "q", q8, {"stage": "compress"})
    saved = load_file(tmp_path / "q" / "model.safetensors")
    assert saved["blocks.0.attn.qkv.weight_q"].dtype == torch.int8
    assert ("wte.weight_q" in saved) == embeddings and ("lm_head.weight_q" in saved) == (embeddings and not tie)
    loaded, _ = load_model_dir(tmp_path / "q")
    assert torch.equal(loaded(x), q8(x))
    assert torch.equal(loaded.generate(x[:, :4], 6, temperature=0), q8.generate(x[:, :4], 6, temperature=0))


def test_int8_with_embeddings_is_under_040_of_the_float_size(tmp_path):
    """The smoke study's source shape (vocab 512, n_embd 64, 2 layers, swiglu): file sizes."""
    src = model(vocab_size=512, block_size=64, n_layer=2, n_embd=64, ffn="swiglu", norm="rmsnorm", pos="rope")
    save_model_dir(tmp_path / "f", src, {})
    save_model_dir(tmp_path / "q", quantize(src, embeddings=True), {})
    save_model_dir(tmp_path / "l", quantize(src, embeddings=False), {})
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in "fql"}
    assert size["q"] <= 0.40 * size["f"] < size["l"]           # the float embedding alone keeps it above


# ---------------------------------------------------------------------------------------------
# pruning

SHAPES = [dict(block=b, ffn=f, n_kv_head=kv, bias=bias, norm=n, pos=pos) for b, f, kv, bias, n, pos in [
    ("serial", "swiglu", 4, False, "rmsnorm", "rope"), ("serial", "gelu", 2, True, "layernorm", "learned"),
    ("parallel", "swiglu", 2, False, "rmsnorm", "rope"), ("parallel", "gelu", 4, True, "layernorm", "rope"),
    ("parallel-2norm", "swiglu", 1, False, "rmsnorm", "rope"), ("parallel-2norm", "gelu", 4, True, "layernorm", "learned")]]


def shape_id(s):
    return "-".join(str(v) for v in s.values())


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pruning_nothing_gives_back_the_source(shape):
    src = model(**shape)
    same = prune(src, *keep_by_score(importance(src, "magnitude", []), 0.0))
    assert same.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())
    assert torch.equal(same(tokens()), src(tokens()))


def expected_params(cfg: ModelConfig) -> int:
    """Embeddings, final norm and head, plus each layer's matrices, biases and norms for its widths."""
    C, hs, V = cfg.n_embd, cfg.head_size, cfg.vocab_size
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    n = V * C * (1 if cfg.tie_embeddings else 2) + (cfg.block_size * C if cfg.pos == "learned" else 0) + norm
    for i in range(cfg.n_layer):
        nh, nkv, d_ff = cfg.layer_widths(i)
        fc_out = 2 * d_ff if cfg.ffn == "swiglu" else d_ff
        attn = C * (nh + 2 * nkv) * hs + nh * hs * C + cfg.bias * ((nh + 2 * nkv) * hs + C) if nh else 0
        ffn = C * fc_out + d_ff * C + cfg.bias * (fc_out + C)
        norms = 1 if cfg.block == "parallel" or not nh else 2
        n += attn + ffn + norms * norm
    return n


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_pruned_model_has_the_formula_params_and_loads_alone(tmp_path, shape, criterion):
    src = model(**shape)
    keep = keep_by_score(importance(src, criterion, batches()), 0.5)
    small = prune(src, *keep)
    cfg = small.cfg
    groups = 3 * src.cfg.n_kv_head
    assert min(cfg.layer_n_kv_head) >= 1 and groups - sum(cfg.layer_n_kv_head) == min(round(0.5 * groups), groups - 3)
    assert sum(cfg.layer_d_ff) == 3 * src.cfg.d_ff - round(0.5 * 3 * src.cfg.d_ff)
    assert small.num_params() == expected_params(cfg) < src.num_params()
    save_model_dir(tmp_path / "p", small, {})
    loaded, _ = load_model_dir(tmp_path / "p")
    x = tokens()
    assert torch.equal(loaded(x), small(x))
    full = loaded(x[:, :8])                                      # per-layer K/V heads in the cache
    cached = loaded.generate(x[:, :4], 4, temperature=0)
    assert torch.equal(cached, loaded.generate(x[:, :4], 4, temperature=0, use_cache=False))
    assert full.shape == (2, 8, TINY["vocab_size"])


def test_pruning_keeps_the_highest_scores_and_one_unit_per_layer():
    groups = [torch.tensor([5.0, 1.0]), torch.tensor([0.1, 0.2]), torch.tensor([9.0, 8.0])]
    channels = [torch.tensor([3.0, 2.0, 1.0, 0.0])]
    keep_g, keep_c = keep_by_score((groups, channels), 0.5)
    assert keep_g == [[0], [1], [0]]     # drops 0.1, 1.0, then 8.0: 0.2 and 5.0 are their layers' last
    assert keep_c == [[0, 1]]


def test_magnitude_pruning_drops_the_smallest_channel_and_keeps_the_largest():
    """A channel's magnitude score is sum |w| over its fc row and proj column. Shrink channel 3 of
    layer 1 and grow channel 7: pruning one channel of the model drops 3, and 7 stays."""
    src = model(block="serial", ffn="gelu")
    mlp = src.blocks[1].mlp
    with torch.no_grad():
        for c, factor in ((3, 1e-3), (7, 10.0)):
            mlp.fc.weight[c] *= factor
            mlp.proj.weight[:, c] *= factor
    groups, channels = importance(src, "magnitude", [])
    torch.testing.assert_close(channels[1], mlp.fc.weight.abs().sum(1) + mlp.proj.weight.abs().sum(0))
    d_ff = src.cfg.d_ff
    _, keep = keep_by_score((groups, channels), 1 / (3 * d_ff))          # 1 of the 3 * d_ff channels
    assert keep == [list(range(d_ff)), [c for c in range(d_ff) if c != 3], list(range(d_ff))]


def test_pruning_a_group_removes_its_heads_exactly():
    """GQA: dropping KV group 1 of layer 0 equals zeroing its query heads' output columns."""
    src = model(n_kv_head=2, block="serial", ffn="swiglu", norm="rmsnorm", pos="rope")
    keep = ([[0], [0, 1], [0, 1]], [list(range(src.cfg.d_ff))] * 3)
    small = prune(src, *keep)
    ref = model(n_kv_head=2, block="serial", ffn="swiglu", norm="rmsnorm", pos="rope")
    with torch.no_grad():
        ref.blocks[0].attn.proj.weight[:, 2 * 8:] = 0           # heads 2, 3 (group 1), head size 8
    assert small.cfg.layer_n_head == [2, 4, 4]
    assert max_diff(small(tokens()), ref(tokens())) < 1e-5


# ---------------------------------------------------------------------------------------------
# attention removal


def zeroed_attention(src: TransformerLM, layers) -> TransformerLM:
    """The source with the attention output (weights and bias) of `layers` zeroed: attention adds nothing."""
    ref = copy.deepcopy(src)
    with torch.no_grad():
        for i in layers:
            b = ref.blocks[i]
            proj = b.attn_proj if src.cfg.block == "parallel" else b.attn.proj
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    return ref


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dropping_no_attention_gives_back_the_source(shape):
    src = model(**shape)
    same = drop_attention(src, [])
    assert same.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())
    assert torch.equal(same(tokens()), src(tokens()))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dropped_attention_equals_a_zeroed_one_and_keeps_the_stack_sequential(tmp_path, shape):
    src = model(**{**shape, "n_layer": 4})
    dropped = drop_attention(src, [1, 2])
    cfg = dropped.cfg
    assert cfg.n_layer == 4 and cfg.layer_n_head == [4, 0, 0, 4] and cfg.layer_d_ff == [src.cfg.d_ff] * 4
    assert dropped.num_params() == expected_params(cfg) < src.num_params()
    x = tokens()
    assert max_diff(dropped(x), zeroed_attention(src, [1, 2])(x)) < 1e-5
    assert max_diff(dropped(x), src(x)) > 1e-3
    save_model_dir(tmp_path / "d", dropped, {})
    loaded, _ = load_model_dir(tmp_path / "d")
    assert torch.equal(loaded(x), dropped(x))
    assert [s is None for s in loaded.new_cache(2, 8).slots] == [False, True, True, False]
    assert torch.equal(loaded.generate(x[:, :4], 4, temperature=0),
                       loaded.generate(x[:, :4], 4, temperature=0, use_cache=False))


def test_attention_search_respects_the_loss_bound():
    src = model(n_layer=3, ffn="swiglu", norm="rmsnorm", pos="rope")
    calib = batches()
    assert search_drops(src, calib, -1.0)[0] == []              # nothing fits below the source's loss
    layers, measured = search_drops(src, calib, 100.0)
    assert layers == [0, 1, 2] and len(measured) == 3 + 2 + 1   # one more each round, the cheapest first
    first = min(measured[:3], key=lambda m: m["loss_increase"])["layers"]     # round 1's cheapest stays dropped
    assert all(first[0] in m["layers"] and len(m["layers"]) == 2 for m in measured[3:5])
    base = sum(lm_loss(src(x), y).item() for x, y in calib) / 2
    one = sum(lm_loss(drop_attention(src, [1])(x), y).item() for x, y in calib) / 2
    assert [m["loss_increase"] for m in measured if m["layers"] == [1]] == [pytest.approx(one - base, abs=1e-5)]


# ---------------------------------------------------------------------------------------------
# FFN Fusion


def parallel_ffns(src: TransformerLM, layers, x: torch.Tensor) -> torch.Tensor:
    """x + sum_j FFN_j(norm_j(x)) with the source's own modules (attention of the run left out)."""
    out = x
    for j in layers:
        b = src.blocks[j]
        if src.cfg.block == "parallel":
            ffn_in = b.w_in(b.ln(x)).split(b.split, dim=-1)[1]
            out = out + b.mlp_proj(b.act(ffn_in))
        else:
            out = out + b.mlp(b.ln_2(x))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_run_equals_its_parallel_formulation(shape):
    src = model(**{**shape, "n_layer": 4})
    fused = fuse_ffns(drop_attention(src, [1, 2, 3]), [(1, 3)])
    assert fused.cfg.n_layer == 2 and fused.cfg.layer_n_head == [4, 0]
    assert fused.cfg.layer_d_ff == [src.cfg.d_ff, 3 * src.cfg.d_ff]
    assert fused.num_params() == expected_params(fused.cfg)
    x = torch.randn(2, 7, src.cfg.n_embd, generator=torch.Generator().manual_seed(3))
    ref = parallel_ffns(src, [1, 2, 3], x)
    assert max_diff(ref, x) > 1e-2
    assert max_diff(fused.blocks[1](x), ref) < 1e-5
    # the whole model: layer 0 as it was, then the fused layer
    rope = (src.rope_cos[:7], src.rope_sin[:7]) if src.cfg.pos == "rope" else None
    h = src.blocks[0](x, rope)
    assert max_diff(fused.blocks[1](fused.blocks[0](x, rope)), parallel_ffns(src, [1, 2, 3], h)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fusion_and_block_parallel_of_ffn_only_layers_compute_the_same(shape):
    """One wide FFN = the FFN-only layers side by side (block-parallel): the fused weights are exact."""
    dropped = drop_attention(model(**{**shape, "n_layer": 4}), [0, 1, 2])
    fused, side_by_side = fuse_ffns(dropped, [(0, 2)]), parallel_blocks(dropped, [(0, 2)])
    assert side_by_side.cfg.parallel_runs == [[0, 2]] and side_by_side.num_params() == dropped.num_params()
    x = tokens()
    assert max_diff(fused(x), side_by_side(x)) < 1e-4 and max_diff(fused(x), dropped(x)) > 1e-3


def test_fusion_refuses_layers_with_attention():
    src = model(n_layer=4)
    with pytest.raises(AssertionError, match="drop_attention first"):
        fuse_ffns(src, [(1, 2)])
    problem, = fusion_run_problems(src.cfg, [[1, 2]], "ffn")
    assert problem.startswith("runs: layers [1, 2] still have attention") and "mode: block-parallel" in problem
    assert fusion_run_problems(src.cfg, [[1, 2]], "block-parallel") == []
    dropped = drop_attention(src, [2, 3]).cfg
    assert "layers [1] still have attention" in fusion_run_problems(dropped, [[1, 3]], "ffn")[0]
    assert fusion_run_problems(dropped, [[2, 3]], "ffn") == [] and fusion_run_problems(dropped, [], "ffn") == []
    assert "no two consecutive" in fusion_run_problems(src.cfg, [], "ffn")[0]


def test_fused_model_loads_alone_and_decodes(tmp_path):
    src = model(n_layer=4, ffn="swiglu", norm="rmsnorm", pos="rope")
    fused = fuse_ffns(drop_attention(src, [0, 1, 2, 3]), [(0, 1), (2, 3)])
    assert fused.cfg.layer_n_head == [0, 0] and fused.num_params() < src.num_params() + 1
    save_model_dir(tmp_path / "f", fused, {})
    loaded, _ = load_model_dir(tmp_path / "f")
    x = tokens()
    assert torch.equal(loaded(x), fused(x))
    assert torch.equal(loaded.generate(x[:, :4], 4, temperature=0),
                       loaded.generate(x[:, :4], 4, temperature=0, use_cache=False))


def test_fusion_search_respects_the_loss_bound():
    src = drop_attention(model(n_layer=3, ffn="swiglu", norm="rmsnorm", pos="rope"), [0, 1, 2])
    calib = batches()
    assert search_runs(src, calib, -1.0)[0] == []               # nothing fits below the source's loss
    runs, measured = search_runs(src, calib, 100.0)
    assert runs == [(0, 2)] and len(measured) == 3              # the longest run first, then no room left
    base = sum(lm_loss(src(x), y).item() for x, y in calib) / 2
    fused = sum(lm_loss(fuse_ffns(src, runs)(x), y).item() for x, y in calib) / 2
    assert [m["loss_increase"] for m in measured if m["runs"] == [[0, 2]]] == [pytest.approx(fused - base, abs=1e-5)]
    partly = drop_attention(model(n_layer=3, ffn="swiglu", norm="rmsnorm", pos="rope"), [1, 2])
    assert search_runs(partly, calib, 100.0)[0] == [(1, 2)]     # mode ffn: runs of FFN-only layers only
    assert search_runs(partly, calib, 100.0, "block-parallel")[0] == [(0, 2)]


# ---------------------------------------------------------------------------------------------
# block parallelism (attention kept)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_block_parallel_run_sums_its_blocks_on_one_input(tmp_path, shape):
    src = model(**{**shape, "n_layer": 4})
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in parallel_blocks(src, []).state_dict().items())
    par = parallel_blocks(src, [(1, 3)])
    assert par.cfg.parallel_runs == [[1, 3]] and par.cfg.n_layer == 4 and par.num_params() == src.num_params()
    x = tokens()
    with torch.no_grad():
        h = src.drop(src.wte(x) + (src.wpe(torch.arange(12)) if src.wpe is not None else 0))
        rope = (src.rope_cos[:12], src.rope_sin[:12]) if src.cfg.pos == "rope" else None
        h = src.blocks[0](h, rope)
        h = h + sum(src.blocks[j](h, rope) - h for j in (1, 2, 3))   # x + sum_j (block_j(x) - x)
        ref = src.lm_head(src.norm_f(h))
    assert max_diff(par(x), ref) < 1e-5 and max_diff(par(x), src(x)) > 1e-3
    save_model_dir(tmp_path / "p", par, {})
    loaded, _ = load_model_dir(tmp_path / "p")
    assert loaded.cfg.parallel_runs == [[1, 3]] and torch.equal(loaded(x), par(x))
    assert len(loaded.new_cache(2, 8).slots) == 4                # every block keeps its own keys and values
    assert torch.equal(loaded.generate(x[:, :4], 6, temperature=0),
                       loaded.generate(x[:, :4], 6, temperature=0, use_cache=False))


def test_block_parallel_models_are_not_exported_nor_halved():
    par = parallel_blocks(model(n_layer=4, ffn="swiglu", norm="rmsnorm", pos="rope"), [(1, 2)])
    with pytest.raises(ParamsError, match="parallel_runs=.*block-parallel runs of layers"):
        hf_family(par.cfg)
    assert "block-parallel runs" in " ".join(teacher_init_problems(par.cfg, {}))
    assert "already run in block-parallel runs" in shape_problems(par.cfg, "ffn_fusion")[0]
    assert shape_problems(par.cfg, "prune") == shape_problems(par.cfg, "attention_drop") == []


# ---------------------------------------------------------------------------------------------
# what each method refuses


@pytest.mark.parametrize("overrides,method,words", [
    (dict(block="par"), "prune", "cannot prune a par model"),
    (dict(block="hybrid"), "ffn_fusion", "cannot fuse a hybrid model"),
    (dict(block="one-wide-ffn"), "prune", "cannot prune a one-wide-ffn model"),
    (dict(n_loop=2), "ffn_fusion", "cannot fuse a looped model"),
    (dict(dwa=True), "prune", "cannot prune a denseformer model"),
])
def test_methods_refuse_models_they_cannot_handle(overrides, method, words):
    problems = shape_problems(ModelConfig(**{**TINY, **overrides}), method)
    assert len(problems) == 1 and problems[0].startswith(words)
    assert shape_problems(ModelConfig(**{**TINY, **overrides}), "int8") == []


def test_int8_models_are_not_compressed_again():
    q8 = quantize(model(), embeddings=False)
    for method in ("int8", "prune", "ffn_fusion", "attention_drop", "identity"):
        assert "an int8 model" in shape_problems(q8.cfg, method)[0]


def test_runs_must_exist_and_be_disjoint():
    cfg = ModelConfig(**TINY)
    assert fusion_run_problems(cfg, [[0, 1], [2, 2]], "block-parallel")[0].startswith("runs: [2, 2] is not a run")
    assert "n_layer=3" in fusion_run_problems(cfg, [[1, 3]], "ffn")[0]
    assert fusion_run_problems(cfg, [[0, 1], [1, 2]], "block-parallel")[0].startswith("runs: [1, 2] overlaps")
    assert fusion_run_problems(cfg, [[0, 2]], "block-parallel") == []
    assert fusion_run_problems(None, [[4, 9]], "ffn") == []
    with pytest.raises(ValueError, match="parallel_runs: \\[1, 3\\] is not a run"):
        ModelConfig(**TINY, parallel_runs=[[1, 3]])


def test_attention_layers_must_exist_and_have_attention():
    cfg = ModelConfig(**TINY)
    assert attention_layer_problems(cfg, [0, 2]) == [] and attention_layer_problems(None, [7]) == []
    assert attention_layer_problems(cfg, [1, 1])[0].startswith("layers: [1, 1] names a layer twice")
    assert "not layers of the source (n_layer=3)" in attention_layer_problems(cfg, [3])[0]
    dropped = drop_attention(model(), [0, 1, 2]).cfg
    assert "have no attention already" in attention_layer_problems(dropped, [1])[0]
    assert "has none left" in attention_layer_problems(dropped, [])[0]


def test_layer_linears_name_real_modules():
    for shape in SHAPES:
        src = fuse_ffns(drop_attention(model(**{**shape, "n_layer": 4}), [2, 3]), [(2, 3)])
        names = dict(src.named_modules())
        for i in range(src.cfg.n_layer):
            parts = layer_linears(src.cfg, i)
            assert all(parts[k] in names for k in ("fc", "proj", "norm"))
            assert (parts["qkv"] in names) if parts["qkv"] else i == 2


@pytest.mark.parametrize("preset", sorted(PRESETS) + ["moe"])
def test_int8_of_every_preset_round_trips(tmp_path, preset):
    """int8 takes any float model: every preset, and an MoE one (experts not stored as Linears stay float)."""
    overrides = dict(n_expert=4, top_k=2) if preset == "moe" else PRESETS[preset]
    src = model(**{**overrides, "ffn": "swiglu", "norm": "rmsnorm", "pos": "rope"})
    q8 = quantize(src, embeddings=True)
    save_model_dir(tmp_path / "q", q8, {})
    loaded, _ = load_model_dir(tmp_path / "q")
    x = tokens()
    assert torch.equal(loaded(x), q8(x)) and max_diff(q8(x), src(x)) < 0.1 * src(x).abs().max()
    assert loaded.num_params() == src.num_params()


def test_attention_gets_16_byte_aligned_rows_when_a_pruned_fused_width_is_odd(monkeypatch):
    """Found on an H200: a parallel block whose w_in width is odd (a pruned d_ff of 351) handed SDPA
    q/k/v views with misaligned rows, and CUDA's attention kernels fault on them ("misaligned address")."""
    import components.model as model_module
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append([t.stride()[:-1] for t in (q, k, v)])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, block="parallel", ffn="swiglu",
                      layer_n_head=[4, 4], layer_n_kv_head=[4, 4], layer_d_ff=[85, 86])
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    x = torch.randint(0, 64, (2, 16))
    y = model(x)
    assert len(seen) == 2 and all(s % 8 == 0 for strides in seen for t in strides for s in t), seen
    assert torch.allclose(y, model(x))
