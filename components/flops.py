"""Training FLOPs (docs/methods.md#flops): per token of a model, and what each stage and lineage spent,
the three keys every meta.json carries (`flops_meta`). Also the generation cache's size (`cache_bytes`).

    forward per token  = 2 x (active matmul weights) + 2 x 2 x n_ctx x d_attn per attention application
                         (+ 2 x 2 x d_state x n_embd per hybrid layer's SSM recurrence)
    training per token = 3 x forward (the backward pass costs twice the forward)

Active matmul weights: every Linear a token goes through: attention projections, FFN, routers, the SSM
heads' projections and the LM head (tied or not); an MoE layer counts top_k of its n_expert experts
(a shared expert and the router fully), soft mixture of attention every expert; a looped stack counts
each application, one-wide-ffn's shared FFN once per layer. Embedding lookups, norms, activations,
softmax, residual adds and DenseFormer's averages are left out (Kaplan et al., arXiv:2001.08361).
n_ctx is the full block_size, as Kaplan, Chinchilla (arXiv:2203.15556), PaLM's MFU and nanoGPT count it:
with the causal mask a query attends to (t + 1) of the keys, about half of them on average, so this
is the dense-attention count, an upper bound of the masked one. d_attn: the query heads' width
(n_head x head_size; GQA shares keys and values, not the score and value products).

    python -c "from components.config import ModelConfig; from components.model import TransformerLM; from components.flops import training_flops_per_token as f; print(f(TransformerLM(ModelConfig(vocab_size=4096))))"
"""
from __future__ import annotations

from fractions import Fraction

import torch.nn as nn

from components.config import ModelConfig
from components.model import CausalSelfAttention, HybridMixer, MixtureOfAttention, ParallelBlock, TransformerLM
from components.quant import Int8Linear


def forward_flops_per_token(model: TransformerLM) -> int:
    """2 x the matmul weights one token uses + attention's scores and weighted values (+ SSM recurrences)."""
    cfg, flops = model.cfg, Fraction(0)
    for name, m in model.named_modules():
        uses = applications(model, name)                    # times a token goes through m
        if isinstance(m, (nn.Linear, Int8Linear)):
            flops += uses * 2 * m.in_features * m.out_features
        flops += uses * 2 * 2 * cfg.block_size * attention_width(m)   # q k^T and p v, n_ctx keys each
        if isinstance(m, HybridMixer):
            flops += uses * 2 * 2 * m.d_state * m.n_head * m.hs  # s = a s + B x, y = C s: per head d_state x hs
    assert flops.denominator == 1, flops                    # experts are alike: top_k of them is whole
    return int(flops)


def training_flops_per_token(model: TransformerLM) -> int:
    """Forward and backward: 3 x the forward (the backward computes gradients of inputs and of weights)."""
    return 3 * forward_flops_per_token(model)


def applications(model: TransformerLM, name: str) -> Fraction:
    """How many times one token goes through module `name`: blocks n_loop times, one-wide-ffn's shared FFN
    once per layer, an MoE expert top_k / n_expert (the share of tokens routed to it, on average)."""
    cfg, uses = model.cfg, Fraction(1)
    if name.startswith("blocks."):
        uses *= cfg.n_loop
    if name.startswith("shared_mlp."):
        uses *= cfg.n_layer * cfg.n_loop
    if ".experts." in name:
        uses *= Fraction(cfg.top_k, cfg.n_expert)
    return uses


def attention_width(m: nn.Module) -> int:
    """d_attn of an attention module: its query heads x head size (0: not attention). A fused parallel
    block and the hybrid mixer attend themselves; a mixture of attention runs every expert's heads."""
    if isinstance(m, MixtureOfAttention):
        return m.n_expert * m.n_head * m.head_size
    if isinstance(m, (CausalSelfAttention, ParallelBlock)):
        return m.n_head * m.head_size
    if isinstance(m, HybridMixer):
        return m.n_head * m.hs
    return 0


def cached_kv_heads(cfg: ModelConfig) -> list[int]:
    """The key/value heads each block of the stack caches, in order (one pass; a looped stack repeats it):
    a par FFN sublayer and a pruned model's FFN-only layer none, mixture of attention every expert's
    (kv-experts) or one shared set (kv-shared), a hybrid block its attention heads' (the SSM keeps a state)."""
    if cfg.block == "par":
        return [cfg.n_kv_head if c == "s" else 0 for c in cfg.layout]
    if cfg.n_attn_expert:
        return [cfg.n_kv_head * (1 if cfg.moa == "kv-shared" else cfg.n_attn_expert)] * cfg.n_layer
    return [cfg.layer_widths(i)[1] for i in range(cfg.n_layer)]


def cache_bytes(cfg: ModelConfig, element_bytes: int = 4) -> dict:
    """What generation's cache (TransformerLM.new_cache) holds for one sequence, at element_bytes per value
    (4: float32):

        kv_cache_bytes_per_token = 2 (k, v) x head_size x element_bytes x n_loop x sum of cached_kv_heads
        state_bytes_per_sequence = n_loop x hybrid layers x n_head x d_state x head_size x element_bytes

    The first grows with every token of context, the second (the SSM heads' state) does not."""
    kv = 2 * cfg.head_size * element_bytes * cfg.n_loop * sum(cached_kv_heads(cfg))
    ssm_layers = cfg.n_layer if cfg.block == "hybrid" else 0
    state = cfg.n_loop * ssm_layers * cfg.n_head * cfg.d_state * cfg.head_size * element_bytes
    return {"kv_cache_bytes_per_token": kv, "state_bytes_per_sequence": state}


def inherited_flops(metas: list[dict]) -> int | None:
    """The training FLOPs of a stage's lineage before it: metas[0]'s total_train_flops, plus what each
    further input (a branch of metas[0], for btx/bam) spent beyond it. None if an input's meta.json has
    no total (written before FLOPs were counted): unknown, not 0."""
    totals = [m.get("total_train_flops") for m in metas]
    if None in totals:
        return None
    return totals[0] + sum(t - totals[0] for t in totals[1:])


def flops_meta(model: TransformerLM, tokens: int, inherited: int | None, teacher: TransformerLM | None = None) -> dict:
    """meta.json's FLOPs keys: flops_per_token (this model, training), train_flops (this stage's `tokens`
    of training, each also paying a `teacher` forward when it distills) and total_train_flops (inherited
    + train_flops; None when the inheritance is unknown)."""
    per_token = training_flops_per_token(model)
    stage = tokens * (per_token + (forward_flops_per_token(teacher) if teacher is not None else 0))
    return {"flops_per_token": per_token, "train_flops": stage,
            "total_train_flops": inherited + stage if inherited is not None else None}
