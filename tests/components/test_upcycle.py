"""Pins components/upcycle.py: sparse upcycling with identical experts reproduces the dense model
(renormalised top-k), BTX from identical branches is sparse upcycling, BAM from identical branches
is the dense parallel model, and with different branches every expert is its branch's FFN or
attention while the rest is their mean, softmax-topk scales the dense FFN by exactly its weights, and
each router_init draws its own distribution. Tiny CPU configs.

    .venv/bin/python -m pytest tests/components/test_upcycle.py -q
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from components.config import ModelConfig
from components.model import CausalSelfAttention, MixtureOfAttention, MoE, TransformerLM, unfuse_parallel_state_dict
from components.upcycle import upcycle_state_dict, upcycled_config

torch.set_num_threads(1)

TINY = dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32)


def dense_model(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def upcycle(method, sources, n_expert, seed=5, router_init="random", expert_noise=0.0, **moe):
    parent_cfg = sources[0].cfg
    cfg = upcycled_config(parent_cfg, method, n_expert, **moe)
    expert_source = [0] * n_expert if method == "sparse" else list(range(len(sources)))
    sd = upcycle_state_dict(cfg, parent_cfg, [m.state_dict() for m in sources], expert_source, seed,
                            router_init, expert_noise)
    model = TransformerLM(cfg).eval()
    model.load_state_dict(sd)                                   # strict: every weight is made
    return model, sd


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


SPARSE_CASES = [
    (dict(block="serial"), dict(top_k=2)),
    (dict(block="serial", ffn="swiglu", n_kv_head=2, bias=True), dict(top_k=1, moe_every=2, shared_expert=True,
                                                                     router="softmax-topk", router_init="zero")),
    (dict(block="parallel", ffn="swiglu", pos="rope"), dict(top_k=2, router_init="uniform")),
    (dict(block="parallel", n_kv_head=1), dict(top_k=3, moe_every=2, shared_expert=True)),
    (dict(block="parallel-unfused", ffn="swiglu"), dict(top_k=2)),
]


@pytest.mark.parametrize("dense_kw,moe_kw", SPARSE_CASES)
def test_sparse_upcycling_reproduces_the_dense_model(dense_kw, moe_kw):
    """Identical experts: any renormalised top-k mix of them is the dense FFN, whatever the router
    (a shared expert takes half of it); softmax-topk weighs them by p_i < 1, so it is not exact."""
    dense = dense_model(**dense_kw)
    moe_kw = dict(moe_kw)
    init = moe_kw.pop("router_init", "random")
    model, _ = upcycle("sparse", [dense], 4, router_init=init, **moe_kw)
    idx = tokens()
    if model.cfg.router == "topk-softmax":
        assert max_diff(model(idx), dense(idx)) < 1e-5
    else:                         # weights p_i < 1: the dense model with its MoE layers' FFN outputs scaled
        assert init == "zero"     # p_i = 1 / n_expert for every token
        assert max_diff(model(idx), scaled_ffns(dense, model.cfg, moe_output_factor(model.cfg))(idx)) < 1e-5


def moe_output_factor(cfg) -> float:
    """MoE output / dense FFN output for identical experts, softmax-topk and a zero router: k experts
    weighed 1 / n_expert each, plus the shared expert; with one, each holds half the FFN."""
    half = 0.5 if cfg.shared_expert else 1.0
    return (half if cfg.shared_expert else 0.0) + cfg.top_k / cfg.n_expert * half


def scaled_ffns(dense: TransformerLM, cfg, factor: float) -> TransformerLM:
    """A copy of the dense model whose FFN output projections (weights and biases) in the layers
    that are MoE in `cfg` are multiplied by `factor`."""
    ref = TransformerLM(dense.cfg).eval()
    ref.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for i, block in enumerate(ref.blocks):
            if (i + 1) % cfg.moe_every == 0:
                for p in block.mlp.proj.parameters():
                    p.mul_(factor)
    return ref


def test_sparse_copies_every_non_ffn_weight_exactly():
    dense = dense_model(block="parallel")
    _, sd = upcycle("sparse", [dense], 4, top_k=2)
    unfused = unfuse_parallel_state_dict(dense.state_dict(), dense.cfg)
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], unfused["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["wte.weight"], dense.state_dict()["wte.weight"])
    for e in range(4):
        assert torch.equal(sd[f"blocks.1.mlp.experts.{e}.fc.weight"], unfused["blocks.1.mlp.fc.weight"])


def test_expert_noise_breaks_the_symmetry_by_its_scale():
    dense = dense_model(block="serial")
    _, sd = upcycle("sparse", [dense], 3, top_k=2, expert_noise=0.01)
    w = dense.state_dict()["blocks.0.mlp.fc.weight"]
    copies = [sd[f"blocks.0.mlp.experts.{e}.fc.weight"] for e in range(3)]
    rel = [((c - w).std() / w.std()).item() for c in copies]
    assert rel == pytest.approx([0.01] * 3, rel=0.1)
    assert not torch.equal(copies[0], copies[1])


@pytest.mark.parametrize("block", ["serial", "parallel"])
def test_btx_from_identical_branches_is_sparse_upcycling(block):
    dense = dense_model(block=block, ffn="swiglu")
    twin = dense_model(block=block, ffn="swiglu")               # same seed: an identical branch
    _, btx = upcycle("btx", [dense, twin], 2, top_k=2, moe_every=1)
    _, sparse = upcycle("sparse", [dense], 2, top_k=2, moe_every=1)
    assert btx.keys() == sparse.keys()
    assert all(torch.equal(btx[k], sparse[k]) for k in btx)


def test_btx_experts_are_the_branches_ffns_and_the_rest_their_mean():
    a, b = dense_model(0, block="serial"), dense_model(7, block="serial")
    model, sd = upcycle("btx", [a, b], 2, top_k=1, router="softmax-topk")
    x = torch.randn(2, 5, TINY["n_embd"])
    for e, branch in enumerate([a, b]):
        assert max_diff(model.blocks[1].mlp.experts[e](x), branch.blocks[1].mlp(x)) == 0
    assert torch.allclose(sd["blocks.0.attn.qkv.weight"],
                          (a.blocks[0].attn.qkv.weight + b.blocks[0].attn.qkv.weight) / 2)
    assert torch.allclose(sd["norm_f.weight"], (a.norm_f.weight + b.norm_f.weight) / 2)


@pytest.mark.parametrize("block", ["parallel", "parallel-unfused"])
@pytest.mark.parametrize("moa", ["kv-experts", "kv-shared"])
@pytest.mark.parametrize("router_init", ["zero", "random"])
def test_bam_from_identical_branches_is_the_dense_parallel_model(block, moa, router_init):
    dense = dense_model(block=block, ffn="swiglu", n_kv_head=2, pos="rope")
    twins = [dense_model(block=block, ffn="swiglu", n_kv_head=2, pos="rope") for _ in range(3)]
    model, _ = upcycle("bam", twins, 3, top_k=2, moa=moa, router_init=router_init)
    assert isinstance(model.blocks[0].attn, MixtureOfAttention) and isinstance(model.blocks[0].mlp, MoE)
    idx = tokens()
    assert max_diff(model(idx), dense(idx)) < 1e-5
    prompt = idx[:, :4]                                          # and its per-expert cache decodes alike
    assert torch.equal(model.generate(prompt, 8, temperature=0), dense.generate(prompt, 8, temperature=0))


@pytest.mark.parametrize("moa", ["kv-experts", "kv-shared"])
def test_bam_attention_experts_are_the_branches_attentions(moa):
    a, b = dense_model(0, block="parallel", n_kv_head=2), dense_model(7, block="parallel", n_kv_head=2)
    model, _ = upcycle("bam", [a, b], 2, top_k=1, router="softmax-topk", moa=moa)
    h = torch.randn(2, 9, TINY["n_embd"], generator=torch.Generator().manual_seed(3))
    mixture = model.blocks[0].attn
    p = F.softmax(mixture.router(h), dim=-1)
    experts = []
    for branch in (a, b):
        attn = CausalSelfAttention(branch.cfg).eval()
        unfused = unfuse_parallel_state_dict(branch.state_dict(), branch.cfg)
        attn.load_state_dict({k[len("blocks.0.attn."):]: v for k, v in unfused.items()
                              if k.startswith("blocks.0.attn.")})
        experts.append(attn)
    if moa == "kv-shared":                                      # one k, v: the mean of the branches'
        qkv = [e.qkv.weight.detach() for e in experts]
        q_rows = TINY["n_embd"]
        mean_kv = (qkv[0][q_rows:] + qkv[1][q_rows:]) / 2
        for e, w in zip(experts, qkv):
            e.qkv.weight.data = torch.cat([w[:q_rows], mean_kv])
    expected = p[..., 0, None] * experts[0](h) + p[..., 1, None] * experts[1](h)
    assert max_diff(mixture(h), expected) < 1e-5


def test_routers_depend_on_the_seed_only():
    dense = dense_model(block="serial")
    _, one = upcycle("sparse", [dense], 4, seed=1, top_k=2)
    _, same = upcycle("sparse", [dense], 4, seed=1, top_k=2)
    _, other = upcycle("sparse", [dense], 4, seed=2, top_k=2)
    assert torch.equal(one["blocks.0.mlp.router.weight"], same["blocks.0.mlp.router.weight"])
    assert not torch.equal(one["blocks.0.mlp.router.weight"], other["blocks.0.mlp.router.weight"])
    assert not torch.equal(one["blocks.0.mlp.router.weight"], one["blocks.1.mlp.router.weight"])
    assert one["blocks.0.mlp.router.weight"].std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize("init", ["zero", "uniform", "random"])
def test_router_init_draws_the_named_distribution(init):
    """FFN and attention routers alike: zero, U(-1/sqrt(C), 1/sqrt(C)) (std 1/sqrt(3C)), or N(0, 0.02)."""
    a, b = dense_model(0, block="parallel"), dense_model(7, block="parallel")
    _, sd = upcycle("bam", [a, b], 2, top_k=2, router_init=init)
    w = torch.cat([sd[f"blocks.{i}.{m}.router.weight"].flatten() for i in range(2) for m in ("mlp", "attn")])
    bound = 1 / math.sqrt(TINY["n_embd"])
    if init == "zero":
        assert torch.equal(w, torch.zeros_like(w))
    elif init == "uniform":
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    else:
        assert w.std().item() == pytest.approx(0.02, rel=0.15)
    assert w.numel() == 4 * 2 * TINY["n_embd"]


def test_continue_keeps_the_config():
    cfg = ModelConfig(**TINY, block="parallel")
    assert upcycled_config(cfg, "continue", 0) == cfg
    assert upcycled_config(cfg, "bam", 2, top_k=1, router="softmax-topk") == replace(
        cfg, n_expert=2, top_k=1, router="softmax-topk", n_attn_expert=2)


def test_moe_with_per_layer_widths_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="per-layer widths .* not supported with MoE"):
        ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block="parallel", n_expert=2, top_k=2,
                    layer_n_head=[4, 4], layer_n_kv_head=[4, 4], layer_d_ff=[64, 80])
