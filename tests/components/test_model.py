"""Pins components/model.py against references: fused == unfused parallel block, KV-cache
decoding == full forward, causality, parameter counts, deterministic init. Tiny CPU configs.

    .venv/bin/python -m pytest tests/components/test_model.py -q
"""
import itertools
from dataclasses import replace

import pytest
import torch

from components.config import BLOCKS, FFNS, NORMS, POSITIONS, ModelConfig
from components.model import (
    BLOCK_CLASSES,
    MLP,
    CausalSelfAttention,
    ParallelBlock,
    TransformerLM,
    UnfusedParallelBlock,
    apply_rope,
    fuse_parallel_block,
    fuse_parallel_state_dict,
    rope_tables,
    unfuse_parallel_state_dict,
)

torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared 2-core box

TINY = dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32)
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def perturb_(module: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter so norms and biases are non-trivial and logits spread out
    (at init the logits are nearly uniform and greedy ties could hide or fake differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def tiny_model(seed: int = 0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return perturb_(TransformerLM(tiny_cfg(**overrides)), seed + 1)


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# 1. fused parallel block == unfused parallel block with concatenated weights

FUSE_CASES = list(itertools.product(FFNS, POSITIONS, ["mha", "gqa"], [False, True]))


@pytest.mark.parametrize("ffn,pos,heads,bias", FUSE_CASES)
def test_fused_parallel_block_matches_unfused(ffn, pos, heads, bias):
    cfg = tiny_cfg(block="parallel-unfused", ffn=ffn, pos=pos, n_kv_head=KV_HEADS[heads], bias=bias)
    torch.manual_seed(0)
    unfused = perturb_(UnfusedParallelBlock(cfg))
    fused = fuse_parallel_block(unfused, cfg).eval()
    assert isinstance(fused, ParallelBlock)
    assert torch.equal(fused.w_in.weight[: unfused.attn.qkv.out_features], unfused.attn.qkv.weight)
    assert torch.equal(fused.w_in.weight[unfused.attn.qkv.out_features:], unfused.mlp.fc.weight)
    x = torch.randn(2, 10, cfg.n_embd, generator=torch.Generator().manual_seed(3))
    rope = None
    if pos == "rope":
        model = TransformerLM(cfg)
        rope = (model.rope_cos[:10], model.rope_sin[:10])
    out_u, out_f = unfused(x, rope), fused(x, rope)
    assert max_diff(out_u, x) > 1e-2          # the block does something
    assert max_diff(out_u, out_f) < 1e-5


@pytest.mark.parametrize("ffn,pos,heads", list(itertools.product(FFNS, POSITIONS, ["mha", "gqa"])))
def test_fused_parallel_model_matches_unfused(ffn, pos, heads):
    unfused = tiny_model(block="parallel-unfused", ffn=ffn, pos=pos, n_kv_head=KV_HEADS[heads])
    fused = TransformerLM(replace(unfused.cfg, block="parallel")).eval()
    fused.load_state_dict(fuse_parallel_state_dict(unfused.state_dict()))  # strict: every name maps
    assert all(isinstance(b, ParallelBlock) for b in fused.blocks)
    idx = tokens(2, 12)
    assert max_diff(fused(idx), unfused(idx)) < 1e-5


def test_fused_state_dict_names():
    sd = tiny_model(block="parallel-unfused", bias=True).state_dict()
    fused_names = set(fuse_parallel_state_dict(sd))
    assert {"blocks.0.w_in.weight", "blocks.0.w_in.bias", "blocks.1.attn_proj.weight",
            "blocks.1.mlp_proj.bias", "blocks.0.ln.weight", "wte.weight"} <= fused_names
    assert not any(".attn." in n or ".mlp." in n for n in fused_names)


def test_unfuse_inverts_fuse_with_per_layer_widths():
    """A pruned fused model's w_in splits at each layer's own widths, and fusing gives it back."""
    model = tiny_model(block="parallel", bias=True, ffn="swiglu", n_kv_head=2,
                       layer_n_head=[4, 2], layer_n_kv_head=[2, 1], layer_d_ff=[64, 100])
    sd = model.state_dict()
    unfused = unfuse_parallel_state_dict(sd, model.cfg)
    assert unfused["blocks.1.attn.qkv.weight"].shape[0] == (2 + 2 * 1) * 8      # head size 8
    assert unfused["blocks.1.mlp.fc.weight"].shape[0] == 2 * 100                # swiglu: gate and up
    back = fuse_parallel_state_dict(unfused)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------
# 2. KV-cache decoding == full forward, for every original block x ffn x norm x pos x heads
#    (the presets' blocks and stacks: tests/components/test_presets.py)

CACHE_CASES = list(itertools.product(["serial", "parallel", "parallel-unfused"], FFNS, NORMS, POSITIONS, KV_HEADS))


@pytest.mark.parametrize("block,ffn,norm,pos,heads", CACHE_CASES)
def test_kv_cache_matches_full_forward(block, ffn, norm, pos, heads):
    model = tiny_model(block=block, ffn=ffn, norm=norm, pos=pos, n_kv_head=KV_HEADS[heads])
    idx = tokens(2, 12)
    full = model(idx)                                         # (B, T, V)
    with torch.no_grad():
        # (a) prefill 5 tokens, then a 3-token chunk (offset causal mask), then one at a time
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache), model(idx[:, 5:8], cache)]
        steps += [model(idx[:, t:t + 1], cache) for t in range(8, 12)]
    assert cache.pos == 12
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    # (b) greedy generation with and without the cache agree token for token
    prompt = idx[:, :4]
    with_cache = model.generate(prompt, 10, temperature=0, use_cache=True)
    without = model.generate(prompt, 10, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache[:, :4], prompt)
    assert torch.equal(with_cache, without)


def test_compiled_generate_is_eager_generate_and_compiles_once():
    """generate(compile=True): the prompt by the eager forward, then every token by the compiled fixed-shape
    step; a second call (another prompt length, the same cache emptied: a hybrid block's SSM state too)
    reuses the compiled step."""
    model = tiny_model(block="hybrid", pos="rope", n_kv_head=2)
    prompt = tokens(2, 12)
    assert torch.equal(model.generate(prompt[:, :5], 8, temperature=0, compile=True),
                       model.generate(prompt[:, :5], 8, temperature=0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(prompt[:, :3], 12, temperature=0, compile=True)
    assert torch.equal(again, model.generate(prompt[:, :3], 12, temperature=0))
    with pytest.raises(ValueError, match="compile=True decodes with the cache"):
        model.generate(prompt, 2, compile=True, use_cache=False)


def test_static_cache_is_kept_per_batch_size_and_emptied_on_every_call():
    model = tiny_model(block="hybrid")                       # k, v and an SSM state per layer
    cache = model.static_cache(2)
    model(tokens(2, 5), cache)
    assert cache.pos == 5 and all(t.abs().sum() > 0 for slot in cache.slots for t in slot)
    again = model.static_cache(2)
    assert again is cache and again.pos == 0 and all(t.abs().sum() == 0 for slot in again.slots for t in slot)
    assert again.max_len == model.cfg.block_size and model.static_cache(3) is not cache
    assert model.double().static_cache(2).slots[0][0].dtype == torch.float64     # a moved model: a new cache


def test_generate_without_cache_slides_past_block_size():
    model = tiny_model()
    out = model.generate(tokens(1, 20), 10, temperature=0, use_cache=False)
    assert out.shape == (1, 30)


def test_sampling_is_reproducible_and_top_k_restricts():
    model = tiny_model()
    prompt = tokens(3, 4)
    a = model.generate(prompt, 8, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 8, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b)
    top1 = model.generate(prompt, 8, sample_top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, model.generate(prompt, 8, temperature=0))


# ---------------------------------------------------------------------------------------------
# attention against a naive per-head loop (pins GQA head grouping: query head h reads kv head h // group)

@pytest.mark.parametrize("heads", KV_HEADS)
def test_attention_matches_naive_reference(heads):
    cfg = tiny_cfg(n_kv_head=KV_HEADS[heads], bias=True)
    torch.manual_seed(0)
    attn = perturb_(CausalSelfAttention(cfg))
    x = torch.randn(2, 7, cfg.n_embd, generator=torch.Generator().manual_seed(1))
    hs, group, T = cfg.head_size, cfg.n_head // cfg.n_kv_head, x.size(1)
    q, k, v = attn.qkv(x).split([cfg.n_embd, cfg.n_kv_head * hs, cfg.n_kv_head * hs], dim=-1)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    heads_out = []
    for h in range(cfg.n_head):
        g = h // group
        qh, kh, vh = q[..., h * hs:(h + 1) * hs], k[..., g * hs:(g + 1) * hs], v[..., g * hs:(g + 1) * hs]
        scores = (qh @ kh.transpose(-1, -2) / hs ** 0.5).masked_fill(future, float("-inf"))
        heads_out.append(scores.softmax(-1) @ vh)                      # (B, T, hs)
    expected = attn.proj(torch.cat(heads_out, dim=-1))
    assert max_diff(attn(x), expected) < 1e-5
    with torch.inference_mode():                                       # decode's path (GQA: SDPA's enable_gqa)
        assert max_diff(attn(x), expected) < 1e-5
        assert torch.equal(attn(x), attn_training_path(attn, x))


def attn_training_path(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """attn(x) through the path taken with gradients on (GQA: k/v heads repeated), inside inference mode."""
    with torch.enable_grad():
        return attn(x).detach()


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 20, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    def score(m, n):
        return (apply_rope(q, (cos[m], sin[m])) @ apply_rope(k, (cos[n], sin[n]))).item()
    assert abs(score(3, 1) - score(15, 13)) < 1e-5
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    assert abs(apply_rope(q, (cos[7], sin[7])).norm() - q.norm()) < 1e-5  # a rotation
    # the rotate-half (GPT-NeoX/Llama) convention: pair (x_i, x_{i+hs/2}) as a complex number
    # times exp(i * m * base^(-2i/hs))
    m = 5
    theta = m * 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    z = torch.complex(q[:4], q[4:]) * torch.polar(torch.ones(4), theta)
    assert max_diff(apply_rope(q, (cos[m], sin[m])), torch.cat([z.real, z.imag])) < 1e-5


@pytest.mark.parametrize("ffn", FFNS)
def test_mlp_matches_reference(ffn):
    cfg = tiny_cfg(ffn=ffn, bias=True)
    torch.manual_seed(0)
    mlp = perturb_(MLP(cfg))
    x = torch.randn(2, 5, cfg.n_embd, generator=torch.Generator().manual_seed(1))
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    if ffn == "gelu":                                                  # exact erf GELU
        act = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    else:                                                              # fc rows are [gate; up]
        gate, up = h[..., :cfg.d_ff], h[..., cfg.d_ff:]
        act = gate * torch.sigmoid(gate) * up
    assert max_diff(mlp(x), act @ mlp.proj.weight.T + mlp.proj.bias) < 1e-5


# ---------------------------------------------------------------------------------------------
# 3. every block builds and is causal

@pytest.mark.parametrize("block,pos", list(itertools.product(BLOCKS, POSITIONS)))
def test_causal(block, pos):
    model = tiny_model(block=block, pos=pos)
    idx = tokens(2, 12)
    changed = idx.clone()
    t = 5
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % TINY["vocab_size"]
    a, b = model(idx), model(changed)
    assert a.shape == (2, 12, TINY["vocab_size"])
    assert max_diff(a[:, :t + 1], b[:, :t + 1]) < 1e-6
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().amax(dim=-1).min() > 1e-3  # every later position moves


def test_block_names_and_classes_agree():
    """config.BLOCKS names what model.BLOCK_CLASSES builds; par and one-wide-ffn are stacks of their own."""
    assert set(BLOCK_CLASSES) | {"par", "one-wide-ffn"} == set(BLOCKS)
    for name, cls in BLOCK_CLASSES.items():
        assert all(type(b) is cls for b in TransformerLM(tiny_cfg(block=name)).blocks), name


# ---------------------------------------------------------------------------------------------
# 4. tied embeddings and parameter counts

def test_tied_embeddings_share_storage():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    V, C = TINY["vocab_size"], TINY["n_embd"]
    assert untied.num_params() - tied.num_params() == V * C


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_num_params_closed_form(n_kv_head):
    cfg = tiny_cfg(n_kv_head=n_kv_head)                       # serial, gelu, layernorm, learned, tied
    d, L, V, T, ff = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size, 4 * cfg.n_embd
    kv_dim = n_kv_head * d // cfg.n_head
    per_layer = 2 * d + d * (d + 2 * kv_dim) + d * d + d * ff + ff * d  # ln_1, ln_2, qkv, proj, fc, proj
    expected = L * per_layer + V * d + T * d + d                      # + wte, wpe, norm_f (no biases)
    assert TransformerLM(cfg).num_params() == expected


# ---------------------------------------------------------------------------------------------
# 5. length limits

def test_cache_past_block_size_raises():
    model = tiny_model()
    cache = model.new_cache(1)
    model(tokens(1, TINY["block_size"]), cache)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, 1), cache)
    with pytest.raises(ValueError, match="block_size"):
        model.new_cache(1, max_len=TINY["block_size"] + 1)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(tokens(1, 20), 10)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, TINY["block_size"] + 1))


def test_short_cache_raises():
    model = tiny_model()
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(1, 5), cache)


# ---------------------------------------------------------------------------------------------
# 6. initialisation

@pytest.mark.parametrize("block", BLOCKS)
def test_init_is_deterministic(block):
    cfg = tiny_cfg(block=block, bias=True)
    torch.manual_seed(7)
    a = TransformerLM(cfg).state_dict()
    torch.manual_seed(7)
    b = TransformerLM(cfg).state_dict()
    torch.manual_seed(8)
    c = TransformerLM(cfg).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_init_scales_residual_projections():
    cfg = tiny_cfg(n_layer=8, n_embd=64, bias=True)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    std = lambda name: model.get_parameter(name).std().item()  # noqa: E731
    assert abs(std("blocks.0.attn.qkv.weight") - 0.02) < 0.002
    assert abs(std("wte.weight") - 0.02) < 0.002
    for name in ("blocks.0.attn.proj.weight", "blocks.3.mlp.proj.weight"):
        assert abs(std(name) - 0.02 / 4) < 0.0005                  # 0.02 / sqrt(2 * 8)
    assert all(torch.all(b == 0) for n, b in model.named_parameters() if n.endswith(".bias"))
