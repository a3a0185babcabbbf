"""Mixture-of-Experts FFN, soft Mixture-of-Attention (BAM) and the blocks that use them, in plain PyTorch.

    python -c "from components.config import ModelConfig; from components.model import TransformerLM; import torch; m = TransformerLM(ModelConfig(vocab_size=100, block='parallel', n_expert=4, n_attn_expert=2)); print(m(torch.zeros(1, 8, dtype=torch.long)).shape, m.num_params(), m.num_active_params())"

`TransformerLM` builds its blocks here when `cfg.n_expert` or `cfg.n_attn_expert` is set:
serial layers get an MoE FFN (`MoESerialBlock`); parallel layers become `RoutedParallelBlock`
(the fused ParallelBlock cannot fuse a router: attention and FFN get separate input matmuls, on
the same normalised input). Layers without MoE or MoA keep the dense blocks of components/model.py.

MoE (METHODS.md b2): router logits s = W_r x (fp32), two conventions:
    topk-softmax (Mixtral): w = softmax(top-k of s), weights sum to 1;
    softmax-topk (Switch, ST-MoE): p = softmax(s), w_i = p_i for i in the top k, not renormalised.
y = sum_i w_i FFN_i(x) (+ a shared dense FFN). Dispatch is dropless: the (token, slot) pairs are
sorted by expert, each expert runs once on its gathered tokens, index_add_ scatters back.
In training mode each MoE layer keeps its last Switch load-balancing loss E * sum_i f_i P_i, its
router z-loss mean_t logsumexp(s_t)^2 and its expert load f (`moe_layers`, `moe_losses`).

MoA (METHODS.md b5, soft routing): y = sum_i softmax(W_a h)_i Attn_i(h); every token uses every
expert. The N experts run as one attention with N x n_head heads: expert e owns query heads
e*nh .. (e+1)*nh - 1, and with kv-experts its own n_kv_head k/v heads (the cache holds N x nkv
heads, one k/v cache per expert), with kv-shared one set of k/v heads that every expert reads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import ModelConfig
from components.model import (
    MLP,
    CausalSelfAttention,
    ParallelBlock,
    SerialBlock,
    UnfusedParallelBlock,
    apply_rope,
    causal_mask,
    make_norm,
    split_heads,
)

# ---------------------------------------------------------------------------------------------
# routing, losses, dispatch (pure functions, tested against closed forms and a naive loop)


def route(logits: torch.Tensor, k: int, router: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> weights (N, k) and expert ids (N, k) of each token's k slots."""
    if router == "topk-softmax":
        top, idx = logits.topk(k, dim=-1)
        return F.softmax(top, dim=-1), idx
    return F.softmax(logits, dim=-1).topk(k, dim=-1)


def expert_load(idx: torch.Tensor, n_expert: int) -> torch.Tensor:
    """f_i: the fraction of the N x k token slots routed to expert i, (E,), sums to 1."""
    return torch.bincount(idx.flatten(), minlength=n_expert).float() / idx.numel()


def load_balancing_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch: E * sum_i f_i * P_i, f from the top-k slots (no gradient), P_i the mean router
    probability (N, E) of expert i. 1 when routing is uniform; HF's load_balancing_loss_func / k."""
    E = probs.size(-1)
    return E * (expert_load(idx, E) * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2, logits (N, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def dispatch(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """y_t = sum_j weights[t, j] * experts[idx[t, j]](x_t), x (N, C) -> (N, C); each expert runs once
    on the tokens routed to it (slots grouped by a stable sort), no token is dropped."""
    k = idx.size(1)
    order = idx.flatten().argsort(stable=True)              # (N*k,) slots grouped by expert
    counts = torch.bincount(idx.flatten(), minlength=len(experts)).tolist()
    token = order // k                                      # (N*k,) the token of each sorted slot
    groups = x[token].split(counts)                         # E x (n_e, C), one gather
    out = torch.cat([experts[e](g) for e, g in enumerate(groups) if len(g)])   # (N*k, C)
    out = out * weights.flatten()[order, None].to(out.dtype)
    return x.new_zeros(x.shape).index_add_(0, token, out.to(x.dtype))  # sum each token's k slots


# ---------------------------------------------------------------------------------------------
# the MoE FFN and the mixture of attention


class MoE(nn.Module):
    """Top-k routed FFN experts (each an MLP of the dense model's shape), optional shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.router_kind = cfg.top_k, cfg.router
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_expert))
        self.shared = MLP(cfg) if cfg.shared_expert else None
        self.aux_loss = self.z_loss = self.load = None      # of the last forward in training mode

    def forward(self, x):
        B, T, C = x.shape
        h = x.reshape(B * T, C)
        logits = self.router(h).float()                     # (N, E), routing in fp32
        weights, idx = route(logits, self.top_k, self.router_kind)   # (N, k), (N, k)
        if self.training:
            self.aux_loss = load_balancing_loss(F.softmax(logits, dim=-1), idx)
            self.z_loss, self.load = router_z_loss(logits), expert_load(idx, len(self.experts))
        y = dispatch(h, weights, idx, self.experts)         # (N, C)
        if self.shared is not None:
            y = y + self.shared(h)
        return y.view(B, T, C)

    def inactive_params(self) -> int:
        """Weights a token skips: the n_expert - top_k experts it is not routed to."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (len(self.experts) - self.top_k) * per_expert


class MixtureOfAttention(nn.Module):
    """Soft MoA (BAM): y = proj(concat_e p_e * attn_e(h)) = sum_e p_e attn_e(h) W_o,e^T (+ bias),
    p = softmax(router(h)). qkv rows: [q of expert 0..N-1; k; v], k and v per expert (kv-experts)
    or once (kv-shared). proj columns: expert 0's heads, then expert 1's, ..."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N, hs = cfg.n_attn_expert, cfg.head_size
        self.n_expert, self.n_head, self.n_kv_head, self.dropout = N, cfg.n_head, cfg.n_kv_head, cfg.dropout
        self.kv_shared = cfg.moa == "kv-shared"
        self.n_kv_total = cfg.n_kv_head * (1 if self.kv_shared else N)   # k/v heads computed and cached
        self.router = nn.Linear(cfg.n_embd, N, bias=False)
        self.qkv = nn.Linear(cfg.n_embd, (N * cfg.n_head + 2 * self.n_kv_total) * hs, bias=cfg.bias)
        self.proj = nn.Linear(N * cfg.n_head * hs, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h, rope=None, kv=None, pos=0):
        B, T, C = h.shape
        N, nh = self.n_expert, self.n_head
        q, k, v = split_heads(self.qkv(h), N * nh, self.n_kv_total)    # (B, N*nh, T, hs), (B, nkv_total, T, hs)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is not None:
            kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v
            k, v = kv[0][:, :, :pos + T].to(q.dtype), kv[1][:, :, :pos + T].to(q.dtype)   # (B, nkv_total, S, hs)
        if self.kv_shared:                                   # every expert reads the same k/v heads
            k, v = k.repeat(1, N, 1, 1), v.repeat(1, N, 1, 1)   # (B, N*nkv, S, hs), expert-major
        if nh != self.n_kv_head:                             # GQA inside each expert
            k = k.repeat_interleave(nh // self.n_kv_head, dim=1)   # (B, N*nh, S, hs)
            v = v.repeat_interleave(nh // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, pos, q.device),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=pos == 0)                # (B, N*nh, T, hs)
        p = F.softmax(self.router(h).float(), dim=-1).to(y.dtype)            # (B, T, N)
        y = y.transpose(1, 2).reshape(B, T, N, -1) * p[..., None]            # (B, T, N, nh*hs)
        return self.drop(self.proj(y.reshape(B, T, -1)))                     # (B, T, C)


# ---------------------------------------------------------------------------------------------
# blocks with MoE/MoA (same forward signature and residual wiring as components/model.py's)


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return cfg.n_expert > 0 and (layer + 1) % cfg.moe_every == 0


class MoESerialBlock(nn.Module):
    """The pre-norm serial block with an MoE FFN (same parameter names as SerialBlock):

        x --+-- ln_1 -- attn --(+)--+-- ln_2 -- MoE --(+)--> y
            +-------------------^   +-----------------^
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), MoE(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        x = x + self.attn(self.ln_1(x), rope, kv, pos)
        return x + self.mlp(self.ln_2(x))


class RoutedParallelBlock(nn.Module):
    """The parallel block with routed parts (BAM's block: y = x + MoA(LN x) + MoE(LN x)); attn is a
    MixtureOfAttention or plain attention, mlp an MoE or a dense MLP (names as UnfusedParallelBlock):

                  +-- attn (MoA) --+
        x --+- ln-+                +--(+)--> y
            |     +-- mlp (MoE) ---+   ^
            +--------------------------+
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln = make_norm(cfg)
        self.attn = MixtureOfAttention(cfg) if cfg.n_attn_expert else CausalSelfAttention(cfg)
        self.mlp = MoE(cfg) if is_moe_layer(cfg, layer) else MLP(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        h = self.ln(x)
        return x + self.attn(h, rope, kv, pos) + self.mlp(h)

    def new_slot(self, batch_size: int, max_len: int, like: torch.Tensor):
        """This block's cache slot (k, v); MoA: every expert's k/v heads."""
        n_kv = self.attn.n_kv_total if isinstance(self.attn, MixtureOfAttention) else self.attn.n_kv_head
        shape = (batch_size, n_kv, max_len, self.ln.weight.numel() // self.attn.n_head)
        return tuple(torch.zeros(shape, device=like.device, dtype=like.dtype) for _ in range(2))


def routed_blocks(cfg: ModelConfig) -> list[nn.Module]:
    """The n_layer blocks of a model with MoE or MoA; layers with neither keep their dense block."""
    blocks = []
    for i in range(cfg.n_layer):
        routed = is_moe_layer(cfg, i) or cfg.n_attn_expert > 0
        if cfg.block == "serial":
            blocks.append(MoESerialBlock(cfg) if routed else SerialBlock(cfg))
        else:
            dense = ParallelBlock if cfg.block == "parallel" else UnfusedParallelBlock
            blocks.append(RoutedParallelBlock(cfg, i) if routed else dense(cfg))
    return blocks


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer of a model, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_losses(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Mean load-balancing and z-loss over the MoE layers' last training forward; None if dense."""
    layers = [m for _, m in moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return None
    return {"aux_loss": torch.stack([m.aux_loss for m in layers]).mean(),
            "z_loss": torch.stack([m.z_loss for m in layers]).mean()}
