"""Dense models -> MoE models: pure config and state-dict transforms (no training, no files).

    cfg = upcycled_config(parent_cfg, "btx", n_expert=2, top_k=1, router="softmax-topk")
    sd = upcycle_state_dict(cfg, parent_cfg, [branch_a.state_dict(), branch_b.state_dict()],
                            expert_source=[0, 1], seed=1337)
    TransformerLM(cfg).load_state_dict(sd)

One function serves the three methods (docs/methods.md: sparse-upcycling, btx, bam); they differ in their sources:
- sparse (Komatsuzaki et al.): sources = [parent], every expert copies it (optionally plus noise);
- btx (Branch-Train-MiX): sources = the branches (and the parent with keep_parent), expert e is
  source e's FFN; every other weight is the mean over the sources;
- bam (Branch-Attend-Mix): as btx, and each source's attention becomes one attention expert of a
  soft mixture of attention (kv-experts: its q, k, v, o; kv-shared: its q, o, with k, v averaged).
Routers are new: random N(0, 0.02) (like every other matmul at init), zero (uniform routing;
top-k ties go to the lowest expert ids) or uniform U(-1/sqrt(C), 1/sqrt(C)) (torch's Linear
default), drawn from a generator seeded by (seed, layer), so the same seed gives the same routers
whatever the method. With a shared expert, it is the mean FFN and every expert's and its output
projection is halved, so that upcycling identical FFNs still reproduces the dense output.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from components.config import ModelConfig
from components.model import TransformerLM, is_moe_layer, unfuse_parallel_state_dict


def upcycled_config(parent: ModelConfig, method: str, n_expert: int, **moe) -> ModelConfig:
    """The parent's config with MoE FFNs (and, for bam, a mixture of n_expert attention experts).
    moe: ModelConfig's MoE fields (top_k, router, moe_every, shared_expert, aux/z_loss_coef, moa)."""
    if method == "continue":
        return parent
    moa = moe.pop("moa", ModelConfig.moa)
    if method == "bam":
        moe |= {"n_attn_expert": n_expert, "moa": moa}
    return replace(parent, n_expert=n_expert, **moe)


def upcycle_state_dict(cfg: ModelConfig, parent_cfg: ModelConfig, sources: list[dict], expert_source: list[int],
                       seed: int, router_init: str = "random", expert_noise: float = 0.0) -> dict:
    """The state dict of TransformerLM(cfg) made from dense state dicts `sources` (of parent_cfg's
    shape): expert e of every MoE (and MoA) layer copies sources[expert_source[e]]; every other
    weight is the mean over sources; routers are new; expert_noise adds noise * std(W) * N(0, 1)
    to each expert copy's weight matrices."""
    assert len(expert_source) == max(cfg.n_expert, cfg.n_attn_expert), (expert_source, cfg)
    dense = [unfuse_parallel_state_dict(sd, parent_cfg) for sd in sources]     # attn.qkv, mlp.fc, ... names
    mean = {k: mean_of([sd[k] for sd in sources]) for k in sources[0]}         # the parent's own layout
    mean_dense = {k: mean_of([sd[k] for sd in dense]) for k in dense[0]}
    with torch.device("meta"):
        target = TransformerLM(cfg)                                            # names and shapes only
    out = {}
    for name in target.state_dict():
        i = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if i is None or not (is_moe_layer(cfg, i) or cfg.n_attn_expert):      # a dense layer, as the parent's
            out[name] = mean[name]
    for i in range(cfg.n_layer):
        if is_moe_layer(cfg, i) or cfg.n_attn_expert:
            out |= routed_layer(cfg, i, dense, mean_dense, expert_source, seed, router_init, expert_noise)
    missing, extra = set(target.state_dict()) - set(out), set(out) - set(target.state_dict())
    assert not missing and not extra, (missing, extra)
    return out


def routed_layer(cfg, i, dense, mean_dense, expert_source, seed, router_init, expert_noise) -> dict:
    """Layer i of an MoE/MoA model: the mean dense layer, its FFN and/or attention made into experts."""
    p = f"blocks.{i}."
    out = {k: v for k, v in mean_dense.items() if k.startswith(p)}
    if is_moe_layer(cfg, i):
        out = {k: v for k, v in out.items() if not k.startswith(p + "mlp.")}
        out[p + "mlp.router.weight"] = new_router((cfg.n_expert, cfg.n_embd), seed, 2 * i, router_init)
        scale = 0.5 if cfg.shared_expert else 1.0          # shared + routed = one FFN for identical copies
        for e, s in enumerate(expert_source):
            g = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * i + e)
            for k, t in ffn_of(dense[s], p).items():
                if expert_noise and t.dim() >= 2:          # weight matrices only, not biases
                    t = t + expert_noise * t.std() * torch.randn(t.shape, generator=g)
                out[f"{p}mlp.experts.{e}.{k}"] = t * scale if k.startswith("proj.") else t
        if cfg.shared_expert:
            out |= {f"{p}mlp.shared.{k}": t * scale if k.startswith("proj.") else t
                    for k, t in ffn_of(mean_dense, p).items()}
    if cfg.n_attn_expert:
        out |= attention_experts(cfg, p, [dense[s] for s in expert_source])
        out[p + "attn.router.weight"] = new_router((cfg.n_attn_expert, cfg.n_embd), seed, 2 * i + 1, router_init)
    return out


def attention_experts(cfg: ModelConfig, p: str, experts: list[dict]) -> dict:
    """MixtureOfAttention weights of one layer from the dense attentions of `experts`: qkv rows
    [q_0 .. q_N-1; k; v] with k, v per expert (kv-experts) or their mean (kv-shared); proj columns
    [o_0 .. o_N-1]; a proj bias is the mean (one bias, however many experts)."""
    hs = cfg.head_size
    sizes = [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs]
    out = {}
    for leaf in ("weight", "bias"):
        if f"{p}attn.qkv.{leaf}" not in experts[0]:
            continue
        q, k, v = zip(*(sd[f"{p}attn.qkv.{leaf}"].split(sizes) for sd in experts))   # N x (rows, C)
        if cfg.moa == "kv-shared":
            k, v = [mean_of(list(k))], [mean_of(list(v))]
        out[f"{p}attn.qkv.{leaf}"] = torch.cat([*q, *k, *v])
    out[f"{p}attn.proj.weight"] = torch.cat([sd[f"{p}attn.proj.weight"] for sd in experts], dim=1)
    if f"{p}attn.proj.bias" in experts[0]:
        out[f"{p}attn.proj.bias"] = mean_of([sd[f"{p}attn.proj.bias"] for sd in experts])
    return out


def ffn_of(sd: dict, p: str) -> dict:
    """The dense FFN of layer prefix p as MLP state-dict names: {'fc.weight': ..., 'proj.weight': ...}."""
    return {k[len(p + "mlp."):]: v for k, v in sd.items() if k.startswith(p + "mlp.")}


def new_router(shape: tuple[int, int], seed: int, slot: int, init: str) -> torch.Tensor:
    """A new router weight (E, C); slot numbers the routers of a model (2i: FFN, 2i+1: attention)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 + slot)
    if init == "zero":
        return torch.zeros(shape)
    if init == "uniform":
        return (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[1])
    assert init == "random", init
    return torch.randn(shape, generator=g) * 0.02


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].clone() if len(tensors) == 1 else torch.stack(tensors).mean(dim=0)

