"""Pins the MoE and mixture-of-attention parts of components/model.py against references: routing conventions, the Switch load-balancing loss
and the z-loss against their closed forms on hand-made routings, dropless dispatch against a naive
per-token loop, the mixture of attention against separate attention modules, KV-cache decoding
against the full forward, active parameter counts in closed form, config round trips and checks.

    .venv/bin/python -m pytest tests/components/test_moe.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

from components.artifacts import load_model_dir, save_model_dir
from components.config import ModelConfig
from components import model as model_mod
from components.quant import quantize_int8_
from components.model import (
    MLP,
    CausalSelfAttention,
    MixtureOfAttention,
    MoE,
    SerialBlock,
    TransformerLM,
    UnfusedParallelBlock,
    dispatch,
    expert_load,
    load_balancing_loss,
    moe_layers,
    moe_losses,
    route,
    router_z_loss,
)

torch.set_num_threads(1)

TINY = dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32)


def cfg_of(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def perturb_(module, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def model_of(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return perturb_(TransformerLM(cfg_of(**overrides)), seed + 1)


def tokens(B, T, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# routing and the losses, on hand-made routings

def test_route_conventions():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    w, idx = route(logits, 2, "topk-softmax")
    assert idx.tolist() == [[0, 2]]
    assert w[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])   # softmax of (2, 1)
    w, idx = route(logits, 2, "softmax-topk")
    p = F.softmax(logits, dim=-1)[0]
    assert idx.tolist() == [[0, 2]] and w[0].tolist() == pytest.approx([p[0].item(), p[2].item()])
    assert w.sum().item() < 1


def test_load_balancing_loss_closed_form():
    # 4 tokens, E = 3, k = 2: slots (0,1), (0,2), (0,1), (1,0) -> counts 4, 3, 1 of 8 slots
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.4, 0.4, 0.2], [0.3, 0.5, 0.2]])
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    f = [4 / 8, 3 / 8, 1 / 8]
    P = [(0.5 + 0.6 + 0.4 + 0.3) / 4, (0.3 + 0.1 + 0.4 + 0.5) / 4, (0.2 + 0.3 + 0.2 + 0.2) / 4]
    assert expert_load(idx, 3).tolist() == pytest.approx(f)
    assert load_balancing_loss(probs, idx).item() == pytest.approx(3 * sum(a * b for a, b in zip(f, P)))
    uniform = torch.full((6, 3), 1 / 3)
    balanced = torch.tensor([[0], [1], [2], [0], [1], [2]])
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0)   # Switch's minimum


def test_router_z_loss_closed_form():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# dispatch == the naive per-token loop

@pytest.mark.parametrize("router,k", [("topk-softmax", 2), ("softmax-topk", 1), ("softmax-topk", 3)])
def test_dispatch_matches_naive_loop(router, k):
    cfg = cfg_of(n_expert=4, top_k=k, router=router, ffn="swiglu", bias=True)
    torch.manual_seed(0)
    moe = perturb_(MoE(cfg), scale=0.3)
    x = torch.randn(3, 7, cfg.n_embd, generator=torch.Generator().manual_seed(2))
    h = x.reshape(-1, cfg.n_embd)
    weights, idx = route(moe.router(h).float(), k, router)
    naive = torch.stack([sum(weights[t, j] * moe.experts[int(idx[t, j])](h[t]) for j in range(k))
                         for t in range(h.size(0))])
    assert max_diff(dispatch(h, weights, idx, moe.experts), naive) < 1e-5
    assert max_diff(moe(x), naive.view_as(x)) < 1e-5
    assert set(idx.flatten().tolist()) == {0, 1, 2, 3}          # every expert got tokens here


def test_dispatch_with_an_idle_expert():
    experts = torch.nn.ModuleList(MLP(cfg_of()) for _ in range(3))
    x = torch.randn(5, 32)
    idx = torch.tensor([[0], [2], [0], [2], [2]])
    w = torch.ones(5, 1)
    expected = torch.stack([experts[int(i)](x[t]) for t, i in enumerate(idx[:, 0])])
    assert max_diff(dispatch(x, w, idx, experts), expected) < 1e-6


@pytest.mark.skipif(not model_mod.GROUPED_MM, reason="torch without _grouped_mm: only the loop exists")
@pytest.mark.parametrize("ffn,bias", [("swiglu", True), ("gelu", False)])
def test_grouped_experts_match_the_loop_in_values_and_gradients(ffn, bias, monkeypatch):
    cfg = cfg_of(n_expert=4, top_k=2, ffn=ffn, bias=bias)
    torch.manual_seed(0)
    moe = perturb_(MoE(cfg), scale=0.3)
    x = torch.randn(40, cfg.n_embd, generator=torch.Generator().manual_seed(3))
    weights = torch.rand(40, 2)
    idx = torch.randint(0, 3, (40, 2), generator=torch.Generator().manual_seed(4))   # expert 3 idle
    results = {}
    for grouped in (True, False):
        monkeypatch.setattr(model_mod, "GROUPED_MM_DEVICES", ("cpu",) if grouped else ())
        monkeypatch.setattr(model_mod, "GROUPED_MM_DTYPES", (torch.float32,))
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        assert model_mod.use_grouped_mm(xg, moe.experts) == grouped      # each path is the one compared
        y = dispatch(xg, weights, idx, moe.experts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[grouped] = [y, xg.grad] + [p.grad.clone() for p in moe.experts[:3].parameters()]
    assert moe.experts[3].fc.weight.grad is None or not moe.experts[3].fc.weight.grad.any()
    assert max(max_diff(a, b) for a, b in zip(results[True], results[False])) < 1e-5


@pytest.mark.skipif(not model_mod.GROUPED_MM, reason="torch without _grouped_mm: only the loop exists")
def test_grouped_experts_under_autocast_compute_in_bf16_as_the_loop_does(monkeypatch):
    cfg = cfg_of(n_expert=4, top_k=2, ffn="swiglu")
    torch.manual_seed(0)
    moe = perturb_(MoE(cfg), scale=0.3)
    x = torch.randn(2, 16, cfg.n_embd)
    outs = {}
    for grouped in (True, False):
        monkeypatch.setattr(model_mod, "GROUPED_MM_DEVICES", ("cpu",) if grouped else ())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model_mod.use_grouped_mm(x, moe.experts) == grouped
            outs[grouped] = moe(x)
    assert max_diff(outs[True], outs[False]) < 2e-2           # bf16 rounding, same casts
    assert max_diff(outs[True], moe(x)) > 1e-6                # (it did run in bf16)


def test_grouped_matmuls_only_in_bf16_on_a_gpu(monkeypatch):
    experts = MoE(cfg_of(n_expert=4, top_k=2)).experts
    x = torch.randn(4, 32)
    assert not model_mod.use_grouped_mm(x, experts)             # the CPU: the loop
    monkeypatch.setattr(model_mod, "GROUPED_MM_DEVICES", ("cpu",))   # (this CPU standing in for a GPU)
    assert not model_mod.use_grouped_mm(x, experts) and not model_mod.use_grouped_mm(x.double(), experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_mod.use_grouped_mm(x, experts) == model_mod.GROUPED_MM
    assert model_mod.use_grouped_mm(x.bfloat16(), experts) == model_mod.GROUPED_MM


def test_expert_counts_match_bincount():
    idx = torch.randint(0, 5, (37, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model_mod.expert_counts(idx, 6), torch.bincount(idx.flatten(), minlength=6))


@pytest.mark.skipif(not model_mod.GROUPED_MM, reason="torch without _grouped_mm: only the loop exists")
def test_a_grouped_moe_model_compiles_to_one_graph(monkeypatch):
    """torch.compile traces the whole MoE forward (routing, counts, grouped matmuls, scatter): no
    data-dependent shapes, no sync with the host, so no graph break."""
    monkeypatch.setattr(model_mod, "GROUPED_MM_DEVICES", ("cpu",))
    model = TransformerLM(cfg_of(block="parallel", ffn="swiglu", n_expert=4, top_k=2)).train()
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 24)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_int8_experts_run_in_the_loop(monkeypatch):
    monkeypatch.setattr(model_mod, "GROUPED_MM_DEVICES", ("cpu",))
    monkeypatch.setattr(model_mod, "GROUPED_MM_DTYPES", (torch.float32,))
    cfg = cfg_of(n_expert=4, top_k=2, ffn="swiglu")
    torch.manual_seed(0)
    q = quantize_int8_(perturb_(MoE(cfg), scale=0.3), embeddings=False)
    assert type(q.experts[0].fc).__name__ == "Int8Linear"
    h = torch.randn(12, cfg.n_embd)
    weights, idx = route(q.router(h).float(), 2, cfg.router)
    naive = torch.stack([sum(weights[t, j] * q.experts[int(idx[t, j])](h[t:t + 1])[0] for j in range(2))
                         for t in range(12)])
    assert max_diff(dispatch(h, weights, idx, q.experts), naive) < 1e-5


def test_moe_with_identical_experts_is_the_dense_ffn():
    cfg = cfg_of(n_expert=4, top_k=2, ffn="swiglu")
    torch.manual_seed(0)
    dense = perturb_(MLP(cfg))
    x = torch.randn(2, 6, cfg.n_embd)
    for router, shared in (("topk-softmax", False), ("softmax-topk", False)):
        moe = perturb_(MoE(cfg_of(n_expert=4, top_k=2, ffn="swiglu", router=router)), scale=1.0)
        for expert in moe.experts:
            expert.load_state_dict(dense.state_dict())
        mass = route(moe.router(x).float(), 2, router)[0].sum(-1, keepdim=True)   # 1 for topk-softmax
        assert max_diff(moe(x), mass * dense(x)) < 1e-6
        if router == "topk-softmax":
            assert torch.allclose(mass, torch.ones_like(mass))


def test_training_forward_keeps_losses_and_load():
    model = model_of(block="serial", n_expert=4, top_k=2, moe_every=2, n_layer=4)
    assert [name for name, _ in moe_layers(model)] == ["blocks.1.mlp", "blocks.3.mlp"]
    model(tokens(2, 10))
    assert moe_losses(model) is None                            # eval mode: nothing kept
    model.train()
    logits = model(tokens(2, 10))
    losses = moe_losses(model)
    assert losses["aux_loss"].item() >= 1.0 - 1e-6 and losses["z_loss"].item() > 0
    for _, layer in moe_layers(model):
        assert layer.load.sum().item() == pytest.approx(1.0) and layer.load.shape == (4,)
    (logits.mean() + losses["aux_loss"] + losses["z_loss"]).backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# mixture of attention == sum_e p_e Attn_e(h) with separate attention modules

def expert_attention(moa: MixtureOfAttention, cfg: ModelConfig, e: int) -> CausalSelfAttention:
    """Expert e of a MixtureOfAttention as a stand-alone CausalSelfAttention."""
    N, hs = cfg.n_attn_expert, cfg.head_size
    q_rows, kv_rows = cfg.n_head * hs, cfg.n_kv_head * hs
    W = moa.qkv.weight
    q = W[e * q_rows:(e + 1) * q_rows]
    kv_base = N * q_rows
    ke = 0 if cfg.moa == "kv-shared" else e
    n_kv = 1 if cfg.moa == "kv-shared" else N
    k = W[kv_base + ke * kv_rows: kv_base + (ke + 1) * kv_rows]
    v = W[kv_base + n_kv * kv_rows + ke * kv_rows: kv_base + n_kv * kv_rows + (ke + 1) * kv_rows]
    attn = CausalSelfAttention(cfg)
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([q, k, v]))
        attn.proj.weight.copy_(moa.proj.weight[:, e * q_rows:(e + 1) * q_rows])
    return attn.eval()


@pytest.mark.parametrize("moa,n_kv_head,pos", [("kv-experts", 4, "rope"), ("kv-experts", 2, "learned"),
                                               ("kv-shared", 2, "rope"), ("kv-shared", 1, "learned")])
def test_mixture_of_attention_matches_its_formula(moa, n_kv_head, pos):
    cfg = cfg_of(block="parallel", n_attn_expert=3, moa=moa, n_kv_head=n_kv_head, pos=pos)
    torch.manual_seed(0)
    mixture = perturb_(MixtureOfAttention(cfg), scale=0.3)
    h = torch.randn(2, 9, cfg.n_embd, generator=torch.Generator().manual_seed(4))
    rope = None
    if pos == "rope":
        m = TransformerLM(cfg)
        rope = (m.rope_cos[:9], m.rope_sin[:9])
    p = F.softmax(mixture.router(h), dim=-1)                                 # (B, T, N)
    expected = sum(p[..., e, None] * expert_attention(mixture, cfg, e)(h, rope) for e in range(3))
    assert max_diff(mixture(h, rope), expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# whole models: cache == full forward, causality, counts, round trip, config checks

MODEL_CASES = {
    "serial-moe": dict(block="serial", n_expert=4, top_k=2),
    "serial-moe-every-2-shared": dict(block="serial", n_expert=3, top_k=1, router="softmax-topk", moe_every=2,
                                      shared_expert=True),
    "parallel-moe": dict(block="parallel", n_expert=4, top_k=2, moe_every=2),
    "bam-kv-experts": dict(block="parallel", n_expert=2, top_k=1, router="softmax-topk", n_attn_expert=2,
                           n_kv_head=2, pos="rope"),
    "bam-kv-shared": dict(block="parallel-unfused", n_expert=3, top_k=2, n_attn_expert=3, moa="kv-shared",
                          n_kv_head=1, bias=True),
    "moa-only": dict(block="parallel", n_attn_expert=2, ffn="swiglu"),
}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_cache_matches_full_forward_and_is_causal(name):
    model = model_of(**MODEL_CASES[name])
    idx = tokens(2, 12)
    full = model(idx)
    with torch.no_grad():
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache), model(idx[:, 5:8], cache)]
        steps += [model(idx[:, t:t + 1], cache) for t in range(8, 12)]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    with torch.no_grad():   # the fixed-shape step (compiled_step's): the whole cache, masked
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache), model.step(idx[:, 5:8], cache, torch.arange(5, 8))]
        steps += [model.step(idx[:, t:t + 1], cache, torch.tensor([t])) for t in range(8, 12)]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % TINY["vocab_size"]
    assert max_diff(model(changed)[:, :7], full[:, :7]) < 1e-5   # not 0: experts batch other token sets
    prompt = idx[:, :4]
    assert torch.equal(model.generate(prompt, 8, temperature=0), model.generate(prompt, 8, temperature=0,
                                                                                use_cache=False))


def test_blocks_per_layer():
    model = TransformerLM(cfg_of(block="parallel", n_expert=2, moe_every=2, n_layer=4))
    assert [type(b).__name__ for b in model.blocks] == ["ParallelBlock", "UnfusedParallelBlock"] * 2
    model = TransformerLM(cfg_of(block="serial", n_expert=2, n_layer=2))
    assert all(isinstance(b, SerialBlock) and isinstance(b.mlp, MoE) for b in model.blocks)
    model = TransformerLM(cfg_of(block="parallel", n_attn_expert=2, n_expert=2, moe_every=2))
    assert all(isinstance(b, UnfusedParallelBlock) and isinstance(b.attn, MixtureOfAttention) for b in model.blocks)
    assert isinstance(model.blocks[0].mlp, MLP) and isinstance(model.blocks[1].mlp, MoE)


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("shared", [False, True])
def test_active_params_closed_form(ffn, shared):
    E, k, L = 4, 2, 4
    cfg = cfg_of(block="parallel", n_layer=L, n_expert=E, top_k=k, moe_every=2, shared_expert=shared, ffn=ffn,
                 n_attn_expert=2)
    model = TransformerLM(cfg)
    d = cfg.n_embd
    expert = d * (2 if ffn == "swiglu" else 1) * cfg.d_ff + cfg.d_ff * d
    moe_layers_count = L // 2
    assert model.num_params() - model.num_active_params() == moe_layers_count * (E - k) * expert
    dense = TransformerLM(cfg_of(block="parallel", n_layer=L, ffn=ffn))
    moa = 2 * (d * 3 * d + d * d) + 2 * d                               # 2 attention experts and their router
    extra_moe = moe_layers_count * ((E - 1 + shared) * expert + E * d)  # more experts, the routers
    attn = d * 3 * d + d * d
    assert model.num_params() == dense.num_params() + L * (moa - attn) + extra_moe


@pytest.mark.parametrize("name", MODEL_CASES)
def test_model_directory_round_trip(tmp_path, name):
    model = model_of(**MODEL_CASES[name], tie_embeddings=False)
    save_model_dir(tmp_path / name, model, {"stage": "upcycle"})
    loaded, _ = load_model_dir(tmp_path / name)
    assert loaded.cfg == model.cfg
    idx = tokens(2, 10)
    assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("overrides,message", [
    (dict(n_expert=2, top_k=3), "top_k=3 must be between 1 and n_expert=2"),
    (dict(n_expert=2, top_k=1), "use router: softmax-topk"),
    (dict(top_k=1), "top_k=1 is only read with n_expert >= 1"),
    (dict(n_expert=2, block="hybrid"), "n_expert needs block in"),
    (dict(n_expert=2, n_loop=2), "n_loop 1"),
    (dict(n_attn_expert=2, block="serial"), "needs a one-norm parallel block"),
    (dict(moa="kv-shared"), "moa='kv-shared' is only read with n_attn_expert >= 1"),
    (dict(n_expert=2, router="topk"), "router='topk' is unknown"),
    (dict(n_expert=4, moe_every=3), "moe_every=3 must be between 1 and n_layer=2"),
])
def test_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cfg_of(**overrides)
