"""TransformerLM: a decoder-only language model built from a ModelConfig, in plain PyTorch.

Blocks: serial (GPT-2/Llama), parallel (PaLM, one fused input matmul), parallel-unfused (GPT-J),
parallel-2norm (GPT-NeoX), par (a layout of attention and FFN sublayers), one-wide-ffn (one FFN
shared by every layer) and hybrid (attention heads and SSM heads side by side). Stacks: plain,
looped (`n_loop`), DenseFormer's depth-weighted averaging (`dwa`) and block-parallel runs
(`parallel_runs`: the layers of a run all read its input, FFN Fusion). LayerNorm or RMSNorm; GELU
or SwiGLU FFN; learned or rotary positions; MHA/GQA/MQA; a preallocated cache (keys/values, SSM
state) for generation. The model returns logits; the loss lives in the training module.

Mixture of experts (`n_expert`) and soft mixture of attention (`n_attn_expert`) are parts that the
serial and unfused parallel blocks pick per layer (`is_moe_layer`): the FFN becomes an `MoE`, the
attention a `MixtureOfAttention`. A routed layer of a fused `parallel` model is built unfused (the
fused input matmul cannot hold a router): attention and FFN get separate input matmuls on the same
normalised input.

MoE (docs/methods.md#moe): router logits s = W_r x (fp32), two conventions:
    topk-softmax (Mixtral): w = softmax(top-k of s), weights sum to 1;
    softmax-topk (Switch, ST-MoE): p = softmax(s), w_i = p_i for i in the top k, not renormalised.
y = sum_i w_i FFN_i(x) (+ a shared dense FFN). Dispatch is dropless: the (token, slot) pairs are
sorted by expert, each expert runs once on its gathered tokens (in bf16 on a GPU: one grouped matmul
per projection for all of them), index_add_ scatters back.
In training mode each MoE layer keeps its last Switch load-balancing loss E * sum_i f_i P_i, its
router z-loss mean_t logsumexp(s_t)^2 and its expert load f (`moe_layers`, `moe_losses`).

MoA (docs/methods.md#bam, soft routing): y = sum_i softmax(W_a h)_i Attn_i(h); every token uses every
expert. The N experts run as one attention with N x n_head heads: expert e owns query heads
e*nh .. (e+1)*nh - 1, and with kv-experts its own n_kv_head k/v heads (the cache holds N x nkv
heads, one k/v cache per expert), with kv-shared one set of k/v heads that every expert reads.

    python -c "from components.config import ModelConfig; from components.model import TransformerLM; import torch; print(TransformerLM(ModelConfig(vocab_size=100))(torch.zeros(1, 8, dtype=torch.long)).shape)"
    python -c "from components.config import ModelConfig; from components.model import TransformerLM; import torch; m = TransformerLM(ModelConfig(vocab_size=100, block='parallel', n_expert=4, n_attn_expert=2)); print(m(torch.zeros(1, 8, dtype=torch.long)).shape, m.num_params(), m.num_active_params())"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import ModelConfig
from components.quant import quantize_int8_
from components.ssm import ssd_scan, ssd_step

Rope = tuple[torch.Tensor, torch.Tensor]    # (cos, sin), each (T, hs), for this call's positions
KV = tuple[torch.Tensor, ...]               # one block application's cache slot: k, v (B, nkv, max_len, hs)[, ssm state]
Pos = int | torch.Tensor                    # where this call's tokens go: the first's position, or each one's (T,)


# ---------------------------------------------------------------------------------------------
# norms, positions, activations


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, in fp32 whatever the logits' dtype: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias or cfg.norm_bias)
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


def make_dropout(cfg: ModelConfig) -> nn.Module:
    """nn.Dropout(cfg.dropout), or nn.Identity when it is 0 (the default): the same numbers, without
    F.dropout's call on every token of decode."""
    return nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()


def rope_tables(head_size: int, n_pos: int, base: float) -> Rope:
    """cos/sin of position * frequency for the rotate-half form, each (n_pos, hs); hs: the channels
    rotated (rope_dim: all of a head's, or GPT-NeoX's first rotary_pct of them)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)   # (n_pos, hs/2)
    angles = torch.cat([angles, angles], dim=-1)                               # (n_pos, hs)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope                                         # (T, rope_dim), broadcast over (B, nh)
    if cos.size(-1) < x.size(-1):                           # partial rotary (GPT-NeoX): the first rope_dim
        n = cos.size(-1)                                    # channels rotate, the rest pass through
        return torch.cat([apply_rope(x[..., :n], rope), x[..., n:]], dim=-1)
    return (x * cos + rotate_half(x) * sin).type_as(x)      # (B, nh, T, hs)


def swiglu(z: torch.Tensor) -> torch.Tensor:
    gate, up = z.chunk(2, dim=-1)                           # (..., 2*d_ff) -> 2 x (..., d_ff)
    return F.silu(gate) * up


ACTIVATIONS = {"gelu": F.gelu, "swiglu": swiglu}            # F.gelu is the exact (erf) GELU


def ffn_in_dim(cfg: ModelConfig, d_ff: int | None = None) -> int:
    """Width of the FFN input matmul (d_ff: a layer's own, else the config's): swiglu computes
    gate and up in one matrix."""
    d_ff = d_ff or cfg.d_ff
    return 2 * d_ff if cfg.ffn == "swiglu" else d_ff


def qkv_dim(cfg: ModelConfig) -> int:
    return (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size


# ---------------------------------------------------------------------------------------------
# attention core, shared by CausalSelfAttention, MixtureOfAttention, the fused ParallelBlock and
# the HybridMixer


def split_heads(qkv: torch.Tensor, n_head: int, n_kv_head: int, rope: Rope | None = None):
    """(B, T, (nh + 2*nkv)*hs) -> q (B, nh, T, hs), k and v (B, nkv, T, hs); with `rope`, q and k rotated
    (in one call: they are adjacent heads)."""
    B, T, _ = qkv.shape
    heads = qkv.view(B, T, n_head + 2 * n_kv_head, -1).transpose(1, 2)   # (B, nh + 2*nkv, T, hs)
    qk, v = heads.split([n_head + n_kv_head, n_kv_head], dim=1)
    if rope is not None:
        qk = apply_rope(qk, rope)
    q, k = qk.split([n_head, n_kv_head], dim=1)
    return q, k, v


def causal_mask(T: int, pos: int, device) -> torch.Tensor | None:
    """Boolean (T, pos+T) mask, True where query pos+i may see key j; None when SDPA needs none."""
    if pos == 0 or T == 1:      # pos == 0: is_causal does it; T == 1: the new token sees everything
        return None
    return torch.arange(pos + T, device=device)[None, :] <= torch.arange(pos, pos + T, device=device)[:, None]


def cached_heads(qkv: torch.Tensor, n_head: int, n_kv_head: int, rope: Rope | None = None,
                 kv: KV | None = None, pos: Pos = 0):
    """q (B, nh, T, hs) and the keys/values so far, k and v (B, nkv, S, hs), from the flat
    projection qkv (B, T, q_dim + 2*kv_dim). With a cache `kv`, this call's keys/values are
    written at pos..pos+T and S = pos+T; without, S = T. With positions `pos` as a tensor (T,)
    (TransformerLM.step), they are written there and k, v are the whole cache: S = max_len."""
    T = qkv.size(1)
    if qkv.stride(1) % 8:       # CUDA attention kernels fault on rows not 16-byte aligned: a fused w_in whose
        qkv = qkv.contiguous()  # width is odd (pruned FFN channels) leaves them so; found on an H200
    q, k, v = split_heads(qkv, n_head, n_kv_head, rope)     # (B, nh, T, hs), (B, nkv, T, hs) x2
    if kv is not None and isinstance(pos, torch.Tensor):    # fixed shapes: causal_sdpa masks the unwritten rest
        kv[0].index_copy_(2, pos, k.to(kv[0].dtype))
        kv[1].index_copy_(2, pos, v.to(kv[1].dtype))
        return q, kv[0].to(q.dtype), kv[1].to(q.dtype)      # (B, nkv, max_len, hs); no copy when dtypes match
    if kv is not None:
        kv[0][:, :, pos:pos + T] = k
        kv[1][:, :, pos:pos + T] = v
        k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]  # (B, nkv, S, hs)
        if k.dtype != q.dtype:                              # a float32 cache under bf16 autocast
            k, v = k.to(q.dtype), v.to(q.dtype)
    return q, k, v


SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)   # SDPA's enable_gqa: torch 2.5+


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Pos = 0,
                dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hs) at positions pos.. (or at the positions of the tensor
    pos (T,)) over k, v (B, nkv, S, hs) -> (B, T, nh*hs)."""
    B, n_head, T, _ = q.shape
    if isinstance(pos, torch.Tensor):                       # query i sees the keys at positions <= pos[i]
        mask, is_causal = torch.arange(k.size(2), device=q.device)[None, :] <= pos[:, None], False   # (T, S)
    else:
        mask, is_causal = causal_mask(T, pos, q.device), pos == 0
    gqa = {}
    if k.size(1) != n_head:                                 # GQA/MQA: each kv head serves a group
        if SDPA_GQA and not torch.is_grad_enabled():        # inference: SDPA reads the shared heads, no copy of the
            gqa = {"enable_gqa": True}                      # cache per step (the same numbers, ~2x faster attention)
        else:                                               # training keeps the copy: SDPA's own GQA rounds bf16
            k = k.repeat_interleave(n_head // k.size(1), dim=1)  # gradients of k, v differently; (B, nh, S, hs)
            v = v.repeat_interleave(n_head // v.size(1), dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                       **gqa)               # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, -1)              # (B, T, nh*hs)


def attend(qkv: torch.Tensor, n_head: int, n_kv_head: int, rope: Rope | None = None,
           kv: KV | None = None, pos: Pos = 0, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention from the flat projection qkv (B, T, q_dim + 2*kv_dim) to (B, T, q_dim).

    With a cache `kv`, this call's keys/values are written at pos..pos+T and the queries
    attend to all pos+T keys so far.
    """
    q, k, v = cached_heads(qkv, n_head, n_kv_head, rope, kv, pos)
    return causal_sdpa(q, k, v, pos, dropout_p)


def kv_slot(batch_size: int, n_kv_head: int, max_len: int, head_size: int, device, dtype) -> KV:
    """An empty cache slot of one attention: k and v, each (B, nkv, max_len, hs)."""
    shape = (batch_size, n_kv_head, max_len, head_size)
    return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


class CausalSelfAttention(nn.Module):
    """n_head/n_kv_head: this layer's own (pruned models), else the config's."""

    def __init__(self, cfg: ModelConfig, n_head: int | None = None, n_kv_head: int | None = None):
        super().__init__()
        self.n_head, self.n_kv_head = n_head or cfg.n_head, n_kv_head or cfg.n_kv_head
        self.dropout, self.head_size = cfg.dropout, cfg.head_size
        rows = (self.n_head + 2 * self.n_kv_head) * cfg.head_size          # q, k, v
        self.qkv = nn.Linear(cfg.n_embd, rows, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(self.n_head * cfg.head_size, cfg.n_embd, bias=cfg.bias)
        self.drop = make_dropout(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        p = self.dropout if self.training else 0.0
        y = attend(self.qkv(x), self.n_head, self.n_kv_head, rope, kv, pos, p)  # (B, T, q_dim)
        return self.drop(self.proj(y))                                          # (B, T, C)

    def new_slot(self, batch_size: int, max_len: int, device, dtype) -> KV:
        return kv_slot(batch_size, self.n_kv_head, max_len, self.head_size, device, dtype)


class MLP(nn.Module):
    """gelu: proj(gelu(fc(x))); swiglu: proj(silu(gate) * up) with [gate; up] = fc(x).
    d_ff: this layer's own width (pruned or fused models), else the config's."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.fc = nn.Linear(cfg.n_embd, ffn_in_dim(cfg, d_ff), bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.ffn]
        self.proj = nn.Linear(d_ff, cfg.n_embd, bias=cfg.bias)
        self.drop = make_dropout(cfg)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))   # (B, T, C) -> (B, T, d_ff) -> (B, T, C)


# ---------------------------------------------------------------------------------------------
# mixture of experts: routing, losses, dispatch (pure functions, tested against closed forms and
# a naive loop), the MoE FFN and the soft mixture of attention


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return cfg.n_expert > 0 and (layer + 1) % cfg.moe_every == 0


def route(logits: torch.Tensor, k: int, router: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> weights (N, k) and expert ids (N, k) of each token's k slots."""
    if router == "topk-softmax":
        top, idx = logits.topk(k, dim=-1)
        return F.softmax(top, dim=-1), idx
    return F.softmax(logits, dim=-1).topk(k, dim=-1)


def expert_counts(idx: torch.Tensor, n_expert: int) -> torch.Tensor:
    """(E,) int64: the token slots routed to each expert. A scatter into E counters, not bincount, whose
    output size depends on the data (a graph break for torch.compile)."""
    flat = idx.flatten()
    return flat.new_zeros(n_expert).scatter_add_(0, flat, torch.ones_like(flat))


def expert_load(idx: torch.Tensor, n_expert: int) -> torch.Tensor:
    """f_i: the fraction of the N x k token slots routed to expert i, (E,), sums to 1."""
    return expert_counts(idx, n_expert).float() / idx.numel()


def load_balancing_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch: E * sum_i f_i * P_i, f from the top-k slots (no gradient), P_i the mean router
    probability (N, E) of expert i. 1 when routing is uniform; HF's load_balancing_loss_func / k."""
    E = probs.size(-1)
    return E * (expert_load(idx, E) * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2, logits (N, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


# torch._grouped_mm: one matmul over jagged groups (torch >= 2.10). Its fused kernel is for bf16 on
# Hopper/Blackwell GPUs; elsewhere it loops over the groups itself (on a GPU after copying the group
# sizes to the host), and torch.compile traces it in bf16 only. So the experts run as grouped matmuls
# where they compute in bf16 on a GPU (bf16-mixed training, bf16 inference); a loop over experts runs
# them everywhere else (on a CPU it is as fast in training and faster in decoding: no copy of every
# expert's weights into one stack per call).
GROUPED_MM = torch.torch_version.TorchVersion(torch.__version__) >= "2.10"
GROUPED_MM_DEVICES, GROUPED_MM_DTYPES = ("cuda",), (torch.bfloat16,)


def dispatch(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """y_t = sum_j weights[t, j] * experts[idx[t, j]](x_t), x (N, C) -> (N, C); no token is dropped.
    The N*k slots are sorted by expert (a stable sort), so expert e's tokens are rows ends[e-1]:ends[e]
    of one gathered batch. In bf16 on a GPU, float experts run as one grouped matmul per projection (no
    kernels per expert, no sync with the host: what made an MoE step launch-bound there); elsewhere, and
    for int8 experts, a loop runs each expert on its rows."""
    k, flat = idx.size(1), idx.flatten()
    order = flat.argsort(stable=True)                       # (N*k,) slots grouped by expert
    token = order // k                                      # (N*k,) the token of each sorted slot
    counts = expert_counts(flat, len(experts))              # (E,) slots per expert
    if use_grouped_mm(x, experts):
        out = grouped_experts(x[token], flat[order], counts, experts)
    else:
        groups = x[token].split(counts.tolist())            # E x (n_e, C), one gather
        out = torch.cat([experts[e](g) for e, g in enumerate(groups) if len(g)])   # (N*k, C)
    out = out * weights.flatten()[order, None].to(out.dtype)
    return x.new_zeros(x.shape).index_add_(0, token, out.to(x.dtype))  # sum each token's k slots


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes x in: autocast's where it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def use_grouped_mm(x: torch.Tensor, experts: nn.ModuleList) -> bool:
    return (GROUPED_MM and x.device.type in GROUPED_MM_DEVICES and compute_dtype(x) in GROUPED_MM_DTYPES
            and all(type(e.fc) is nn.Linear and type(e.proj) is nn.Linear for e in experts))


def grouped_experts(xs: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Every expert's MLP (fc -> act -> proj -> dropout) on its rows of xs (N*k, C), sorted by expert
    (`expert`: each row's expert id), as torch._grouped_mm over the experts' stacked weights. The
    operands are cast as autocast casts F.linear's (grouped_mm is not on its lists)."""
    dtype = compute_dtype(xs)
    ends = counts.cumsum(0).to(torch.int32)                 # group e is rows ends[e-1]:ends[e]

    def linear(h, name):
        layers = [getattr(e, name) for e in experts]
        w = torch.stack([m.weight for m in layers]).to(dtype)               # (E, out, in)
        y = torch._grouped_mm(h.to(dtype), w.transpose(1, 2), offs=ends)   # (N*k, out)
        if layers[0].bias is not None:
            y = y + torch.stack([m.bias for m in layers]).to(dtype)[expert]
        return y
    first = experts[0]
    return first.drop(linear(first.act(linear(xs, "fc")), "proj"))


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
        self.kv_shared, self.head_size = cfg.moa == "kv-shared", hs
        self.n_kv_total = cfg.n_kv_head * (1 if self.kv_shared else N)   # k/v heads computed and cached
        self.router = nn.Linear(cfg.n_embd, N, bias=False)
        self.qkv = nn.Linear(cfg.n_embd, (N * cfg.n_head + 2 * self.n_kv_total) * hs, bias=cfg.bias)
        self.proj = nn.Linear(N * cfg.n_head * hs, cfg.n_embd, bias=cfg.bias)
        self.drop = make_dropout(cfg)

    def forward(self, h, rope=None, kv=None, pos=0):
        B, T, C = h.shape
        N = self.n_expert
        q, k, v = cached_heads(self.qkv(h), N * self.n_head, self.n_kv_total, rope, kv, pos)
        if self.kv_shared:                                   # every expert reads the same k/v heads
            k, v = k.repeat(1, N, 1, 1), v.repeat(1, N, 1, 1)   # (B, N*nkv, S, hs), expert-major
        y = causal_sdpa(q, k, v, pos, self.dropout if self.training else 0.0)   # (B, T, N*nh*hs)
        p = F.softmax(self.router(h).float(), dim=-1).to(y.dtype)            # (B, T, N)
        y = y.view(B, T, N, -1) * p[..., None]                               # (B, T, N, nh*hs)
        return self.drop(self.proj(y.reshape(B, T, -1)))                     # (B, T, C)

    def new_slot(self, batch_size: int, max_len: int, device, dtype) -> KV:
        """Every expert's k/v heads (kv-experts), or the one shared set (kv-shared)."""
        return kv_slot(batch_size, self.n_kv_total, max_len, self.head_size, device, dtype)


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


# ---------------------------------------------------------------------------------------------
# blocks: forward(x, rope, kv, pos) -> x, all (B, T, C); kv is the block's cache slot or None;
# new_slot(batch_size, max_len, device, dtype) -> an empty cache slot for it (None: it needs none)


class SerialBlock(nn.Module):
    """Pre-norm serial block (GPT-2/Llama); on an MoE layer the FFN is an MoE:

        x --+-- ln_1 -- attn --(+)--+-- ln_2 -- mlp --(+)--> y
            |                   ^   |                  ^
            +-------------------+   +------------------+
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        n_head, n_kv_head, d_ff = cfg.layer_widths(layer)
        self.ln_1, self.attn = make_norm(cfg), CausalSelfAttention(cfg, n_head, n_kv_head)
        self.ln_2, self.mlp = make_norm(cfg), MoE(cfg) if is_moe_layer(cfg, layer) else MLP(cfg, d_ff)

    def forward(self, x, rope=None, kv=None, pos=0):
        x = x + self.attn(self.ln_1(x), rope, kv, pos)
        return x + self.mlp(self.ln_2(x))

    def new_slot(self, batch_size, max_len, device, dtype) -> KV:
        return self.attn.new_slot(batch_size, max_len, device, dtype)


class Parallel2NormBlock(SerialBlock):
    """Parallel block with one norm per branch (GPT-NeoX, Falcon-40B); SerialBlock's parts, wired
    side by side:

                +-- ln_1 -- attn --+
        x --+---+                  +--(+)--> y        y = x + attn(ln_1(x)) + mlp(ln_2(x))
            |   +-- ln_2 -- mlp ---+   ^
            +--------------------------+
    """

    def forward(self, x, rope=None, kv=None, pos=0):
        return x + self.attn(self.ln_1(x), rope, kv, pos) + self.mlp(self.ln_2(x))


class UnfusedParallelBlock(nn.Module):
    """Parallel block (GPT-J/PaLM), one shared norm, attention and FFN as separate modules; with
    routed parts BAM's block, y = x + MoA(ln(x)) + MoE(ln(x)):

                  +-- attn (MoA) --+
        x --+- ln-+                +--(+)--> y        y = x + attn(ln(x)) + mlp(ln(x))
            |     +-- mlp (MoE) ---+   ^
            +--------------------------+
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln = make_norm(cfg)
        self.attn = MixtureOfAttention(cfg) if cfg.n_attn_expert else CausalSelfAttention(cfg)
        self.mlp = MoE(cfg) if is_moe_layer(cfg, layer) else MLP(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        h = self.ln(x)
        return x + self.attn(h, rope, kv, pos) + self.mlp(h)

    def new_slot(self, batch_size, max_len, device, dtype) -> KV:
        return self.attn.new_slot(batch_size, max_len, device, dtype)


class ParallelBlock(nn.Module):
    """Fused parallel block (PaLM): one input matmul w_in yields q, k, v and the FFN input.

                         +-- q,k,v -- attend -- attn_proj --+
        x --+- ln - w_in-+                                  +--(+)--> y
            |            +-- ffn_in -- act ---- mlp_proj ---+   ^
            +---------------------------------------------------+

    w_in.weight rows are [q; k; v; ffn input] = cat([attn.qkv.weight, mlp.fc.weight]) of the
    unfused block (FUSED_NAMES), so `fuse_parallel_block` converts one into the other exactly.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, d_ff = cfg.layer_widths(layer)
        self.dropout, self.head_size = cfg.dropout, cfg.head_size
        self.split = fused_split(cfg, layer)                # [q,k,v rows, FFN input rows]
        self.ln = make_norm(cfg)
        self.w_in = nn.Linear(cfg.n_embd, sum(self.split), bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.ffn]
        self.attn_proj = nn.Linear(self.n_head * cfg.head_size, cfg.n_embd, bias=cfg.bias)
        self.mlp_proj = nn.Linear(d_ff, cfg.n_embd, bias=cfg.bias)
        self.drop = make_dropout(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        qkv, ffn_in = self.w_in(self.ln(x)).split(self.split, dim=-1)  # (B, T, qkv_dim), (B, T, ffn_in)
        p = self.dropout if self.training else 0.0
        att = attend(qkv, self.n_head, self.n_kv_head, rope, kv, pos, p)  # (B, T, q_dim)
        return x + self.drop(self.attn_proj(att)) + self.drop(self.mlp_proj(self.act(ffn_in)))

    def new_slot(self, batch_size, max_len, device, dtype) -> KV:
        return kv_slot(batch_size, self.n_kv_head, max_len, self.head_size, device, dtype)


class AttentionSublayer(nn.Module):
    """PAR's `s` (arXiv:2009.04534): x --+-- ln -- attn --(+)--> y   (a serial block's first half)
                                         +-----------------^"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln, self.attn = make_norm(cfg), CausalSelfAttention(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        return x + self.attn(self.ln(x), rope, kv, pos)

    def new_slot(self, batch_size, max_len, device, dtype) -> KV:
        return self.attn.new_slot(batch_size, max_len, device, dtype)


class FFNSublayer(nn.Module):
    """PAR's `f`: x --+-- ln -- mlp --(+)--> y   (a serial block's second half; no cache slot)
                      +----------------^
    Also a pruned or fused model's FFN-only layer (0 heads; FFN Fusion's fused layer)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln, self.mlp = make_norm(cfg), MLP(cfg, cfg.layer_widths(layer)[2])

    def forward(self, x, rope=None, kv=None, pos=0):
        return x + self.mlp(self.ln(x))

    def new_slot(self, batch_size, max_len, device, dtype) -> None:
        return None


class SharedFFNBlock(nn.Module):
    """One Wide FFN layer (arXiv:2309.01826, decoder-only analogue): the serial block whose FFN is
    one module shared by every layer (and d_ff wide, n_layer times the default); norms and
    attention stay per layer.

        x --+-- ln_1 -- attn --(+)--+-- ln_2 -- shared_mlp --(+)--> y
            |                   ^   |                         ^
            +-------------------+   +-------------------------+
    """

    def __init__(self, cfg: ModelConfig, shared_mlp: MLP):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = make_norm(cfg), CausalSelfAttention(cfg), make_norm(cfg)
        self.shared = (shared_mlp,)     # a tuple: not registered here; the model owns it once (`shared_mlp.*`)

    def forward(self, x, rope=None, kv=None, pos=0):
        x = x + self.attn(self.ln_1(x), rope, kv, pos)
        return x + self.shared[0](self.ln_2(x))

    def new_slot(self, batch_size, max_len, device, dtype) -> KV:
        return self.attn.new_slot(batch_size, max_len, device, dtype)


class HybridMixer(nn.Module):
    """Hymba's hybrid-head module: n_head attention heads and n_head SSM heads (components/ssm.py,
    head_size channels and a d_state state each) read the same input; one fused input matmul
    yields q, k, v and the SSM's x, gate z, B, C and per-head step dt. Each output is normalised,
    the two are averaged and projected back. The SSM's state lives in the cache slot (kv[2]).
    Decay a_t = exp(-dt_t), dt_t = softplus(.. + dt_bias) starts in [0.001, 0.1] (a in [0.90, 0.999])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.dropout, self.hs = cfg.n_head, cfg.n_kv_head, cfg.dropout, cfg.head_size
        C, N = cfg.n_embd, cfg.d_state
        self.d_state = N
        self.split = [qkv_dim(cfg), C, C, N, N, cfg.n_head]                 # q,k,v | x | z | B | C | dt
        self.w_in = nn.Linear(C, sum(self.split), bias=cfg.bias)
        # one time scale per head; softplus(dt_bias) = dt. In float64, then rounded: the same bytes on
        # every CPU (float32 exp/log differ in the last bit between SIMD kernels)
        dt = torch.logspace(-3, -1, cfg.n_head, dtype=torch.float64)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).float())
        self.norm_attn, self.norm_ssm = make_norm(cfg), make_norm(cfg)
        self.proj = nn.Linear(C, C, bias=cfg.bias)
        self.drop = make_dropout(cfg)

    def forward(self, h, rope=None, kv=None, pos=0):
        B, T, C = h.shape
        qkv, x, z, Bm, Cm, dt = self.w_in(h).split(self.split, dim=-1)     # (B, T, *)
        att = attend(qkv, self.n_head, self.n_kv_head, rope, kv, pos, self.dropout if self.training else 0.0)
        dt = F.softplus(dt.float() + self.dt_bias).transpose(1, 2)          # (B, nh, T)
        x = x.view(B, T, self.n_head, self.hs).transpose(1, 2) * dt[..., None]  # (B, nh, T, hs): dt_t x_t
        state = kv[2] if kv is not None else x.new_zeros(B, self.n_head, Bm.size(-1), self.hs)
        y, state_out = (ssd_step if T == 1 else ssd_scan)(x, -dt, Bm, Cm, state)  # (B, nh, T, hs)
        if kv is not None:
            kv[2].copy_(state_out)
        y = y.transpose(1, 2).reshape(B, T, C) * F.silu(z)                 # (B, T, C), gated as in Mamba
        return self.drop(self.proj((self.norm_attn(att) + self.norm_ssm(y)) / 2))

    def new_slot(self, batch_size: int, max_len: int, device, dtype) -> KV:
        """k, v (B, nkv, max_len, hs) and the SSM state (B, nh, d_state, hs)."""
        ssm = torch.zeros(batch_size, self.n_head, self.d_state, self.hs, device=device, dtype=dtype)
        return *kv_slot(batch_size, self.n_kv_head, max_len, self.hs, device, dtype), ssm


class HybridBlock(nn.Module):
    """Hybrid-head block (Hymba arXiv:2411.13676, Falcon-H1): attention heads and SSM heads side
    by side on the same normalised input, then the FFN as in the serial block.

                     +-- attention heads -- norm_attn --+
        x --+- ln_1 -+                                  mean -- proj --(+)--+-- ln_2 -- mlp --(+)--> y
            |        +-- SSM heads -------- norm_ssm ---+              ^    |                  ^
            +----------------------------------------------------------+    +------------------+
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln_1, self.mixer = make_norm(cfg), HybridMixer(cfg)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None, kv=None, pos=0):
        x = x + self.mixer(self.ln_1(x), rope, kv, pos)
        return x + self.mlp(self.ln_2(x))

    def new_slot(self, batch_size, max_len, device, dtype) -> KV:
        return self.mixer.new_slot(batch_size, max_len, device, dtype)


# The classes of config.BLOCKS's names, built per layer as cls(cfg, layer); par and one-wide-ffn
# are stacks that make_blocks builds from AttentionSublayer/FFNSublayer and SharedFFNBlock.
BLOCK_CLASSES = {"serial": SerialBlock, "parallel": ParallelBlock, "parallel-unfused": UnfusedParallelBlock,
                 "parallel-2norm": Parallel2NormBlock, "hybrid": HybridBlock}


def make_blocks(cfg: ModelConfig, shared_mlp: MLP | None) -> list[nn.Module]:
    """The distinct blocks of the stack, in order (a looped stack runs them n_loop times)."""
    if cfg.block == "par":
        return [AttentionSublayer(cfg) if c == "s" else FFNSublayer(cfg) for c in cfg.layout]
    if cfg.block == "one-wide-ffn":
        return [SharedFFNBlock(cfg, shared_mlp) for _ in range(cfg.n_layer)]
    return [block_class(cfg, i)(cfg, i) for i in range(cfg.n_layer)]


def block_class(cfg: ModelConfig, layer: int) -> type[nn.Module]:
    """The block of layer `layer`: an FFN-only layer where pruning left 0 heads; unfused where a
    fused parallel layer has an MoE FFN or mixture of attention (w_in cannot hold a router)."""
    if cfg.layer_n_head and not cfg.layer_n_head[layer]:
        return FFNSublayer
    if cfg.block == "parallel" and (is_moe_layer(cfg, layer) or cfg.n_attn_expert):
        return UnfusedParallelBlock
    return BLOCK_CLASSES[cfg.block]


class DepthWeightedAverage(nn.Module):
    """DenseFormer's DWA (arXiv:2402.02622). After block application i (1-based) with
    i % dwa_period == 0:  Y_i = sum_{j <= i, j = i mod dwa_dilation} alpha_{i,j} X_j,
    where X_0 is the embedding output and X_j application j's output (its input was Y_{j-1});
    elsewhere Y_i = X_i. alpha_{i,i} = 1, the rest 0 at init: the plain stack.

        X_0 -- block_1 -- X_1 -(DWA)- Y_1 -- block_2 -- X_2 -(DWA)- Y_2 -- ...
         |                 |     ^                        |     ^
         +-----------------+-----+------------------------+-----+   (every X_j is kept)
    """

    def __init__(self, n_apps: int, dilation: int, period: int):
        super().__init__()
        self.dilation, self.period = dilation, period
        self.alphas = nn.ParameterList(     # alphas[m] weighs X_i, X_{i-k}, X_{i-2k}, ... for i = (m+1)*period
            nn.Parameter(F.one_hot(torch.tensor(0), i // dilation + 1).float())
            for i in range(period, n_apps + 1, period))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        i = len(xs) - 1                                     # xs = [X_0, ..., X_i], each (B, T, C)
        if i % self.period:
            return xs[i]
        picked = torch.stack(xs[i::-self.dilation])         # (n, B, T, C): X_i, X_{i-k}, ...
        return torch.einsum("n,nbtc->btc", self.alphas[i // self.period - 1].to(picked.dtype), picked)



# ---------------------------------------------------------------------------------------------
# the fused parallel layout: ParallelBlock's names for UnfusedParallelBlock's modules (w_in holds
# attn.qkv's rows, then mlp.fc's: fused_split). Converters both ways and compress.py read it here.

FUSED_NAMES = {"attn.qkv": "w_in", "mlp.fc": "w_in", "attn.proj": "attn_proj", "mlp.proj": "mlp_proj"}


def fused_split(cfg: ModelConfig, layer: int = 0) -> list[int]:
    """Rows of layer `layer`'s w_in: [q; k; v] of its heads, then its FFN input."""
    n_head, n_kv_head, d_ff = cfg.layer_widths(layer)
    return [(n_head + 2 * n_kv_head) * cfg.head_size, ffn_in_dim(cfg, d_ff)]


def fuse_parallel_state_dict(sd: dict) -> dict:
    """Map a parallel-unfused state dict (of a block or a whole model) to the fused layout:
    w_in = cat([attn.qkv, mlp.fc]), attn.proj -> attn_proj, mlp.proj -> mlp_proj; rest as is."""
    out = {}
    for name, t in sd.items():
        p, module, leaf = split_name(name, FUSED_NAMES)     # "blocks.0.", "attn.qkv", "weight"
        if module is None:
            out[name] = t
        elif module == "attn.qkv":
            out[f"{p}w_in.{leaf}"] = torch.cat([t, sd[f"{p}mlp.fc.{leaf}"]])  # rows [q; k; v; ffn]
        elif module != "mlp.fc":                            # mlp.fc went into w_in with attn.qkv
            out[f"{p}{FUSED_NAMES[module]}.{leaf}"] = t
    return out


def unfuse_parallel_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """The inverse of fuse_parallel_state_dict for a `parallel` model: w_in -> attn.qkv and
    mlp.fc, attn_proj -> attn.proj, mlp_proj -> mlp.proj (UnfusedParallelBlock names). Other
    blocks' state dicts are returned as they are."""
    if cfg.block != "parallel":
        return dict(sd)
    unfused = {fused: name for name, fused in FUSED_NAMES.items() if fused != "w_in"}   # attn_proj -> attn.proj
    out = {}
    for name, t in sd.items():
        p, module, leaf = split_name(name, ["w_in", *unfused])
        if module is None:
            out[name] = t
        elif module == "w_in":
            layer = int(p.split(".")[-2]) if p else 0       # "blocks.3." -> 3; a lone block's "" -> 0
            out[f"{p}attn.qkv.{leaf}"], out[f"{p}mlp.fc.{leaf}"] = t.split(fused_split(cfg, layer))
        else:
            out[f"{p}{unfused[module]}.{leaf}"] = t
    return out


def split_name(name: str, modules) -> tuple[str, str | None, str]:
    """"blocks.0.attn.qkv.weight" -> ("blocks.0.", "attn.qkv", "weight") when "attn.qkv" is in
    `modules` ("attn.qkv.weight" -> ("", "attn.qkv", "weight")); (name, None, leaf) when none is."""
    path, _, leaf = name.rpartition(".")
    for module in modules:
        if path == module or path.endswith("." + module):
            return path[: len(path) - len(module)], module, leaf
    return name, None, leaf


def fuse_parallel_block(unfused: UnfusedParallelBlock, cfg: ModelConfig) -> ParallelBlock:
    fused = ParallelBlock(cfg).to(unfused.ln.weight.device, unfused.ln.weight.dtype)
    fused.load_state_dict(fuse_parallel_state_dict(unfused.state_dict()))
    return fused


# ---------------------------------------------------------------------------------------------
# the language model


@dataclass
class KVCache:
    """What generation carries from one call to the next, one slot per block application (a
    looped stack applies each block n_loop times, each application with its own keys): (k, v),
    each (B, nkv, max_len, hs); a hybrid block's slot adds its SSM state (B, nh, d_state, hs);
    a par FFN sublayer's slot is None."""
    slots: list[KV | None]
    max_len: int
    pos: int = 0                                            # number of tokens already stored


RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.proj.weight", "attn_proj.weight", "mlp_proj.weight",
                        "mixer.proj.weight")


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.rope_dim, cfg.block_size, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, rope_dim)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = make_dropout(cfg)
        self.shared_mlp = MLP(cfg) if cfg.block == "one-wide-ffn" else None
        self.blocks = nn.ModuleList(make_blocks(cfg, self.shared_mlp))
        n_apps = cfg.n_loop * len(self.blocks)
        self.groups = application_groups(cfg, n_apps)
        self.dwa = DepthWeightedAverage(n_apps, cfg.dwa_dilation, cfg.dwa_period) if cfg.dwa else None
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(init_weights)
        for name, p in self.named_parameters():             # GPT-2: scale the residual branches
            if name.endswith(RESIDUAL_PROJECTIONS) or ".mlp." in name and name.endswith(".proj.weight"):
                # (2 per layer and loop; par: 1 per sublayer; MoE: every expert's and the shared expert's)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer * cfg.n_loop))
        if cfg.quant == "int8":                             # int8 weights (compress@), loaded after this
            quantize_int8_(self, cfg.quant_embeddings)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab). With a cache, idx continues it."""
        return self.lm_head(self.hidden(idx, cache))        # (B, T, vocab)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, C) that lm_head reads (hidden-state distillation)."""
        T = idx.size(1)
        pos = cache.pos if cache is not None else 0
        self.check_length(pos + T, cache)
        x = self.stack(idx, torch.arange(pos, pos + T, device=idx.device), cache, pos)
        if cache is not None:
            cache.pos += T
        return x

    def step(self, idx: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """A decode step whose shapes never change, for torch.compile and CUDA graphs (compiled_step):
        idx (B, T) at `positions` (T,) (a long tensor on the model's device) -> logits (B, T, vocab).
        Every attention writes its keys/values at `positions` and reads its whole cache slot, the
        positions past each query masked. The caller checks the length and advances cache.pos."""
        return self.lm_head(self.stack(idx, positions, cache, positions))

    def stack(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, pos: Pos) -> torch.Tensor:
        """Embeddings, every block application, the final norm: idx (B, T) -> (B, T, C)."""
        x = self.wte(idx)                                   # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = (self.rope_cos[positions], self.rope_sin[positions]) if self.cfg.pos == "rope" else None
        x = self.drop(x)
        xs = [x]                                            # DWA: X_0, X_1, ... (block outputs)
        apps = self.applications()
        for group in self.groups:                           # a block-parallel run: each block reads the same x
            ys = [apps[a](x, rope, cache.slots[a] if cache is not None else None, pos) for a in group]
            x = ys[0] if len(ys) == 1 else x + sum(y - x for y in ys)   # x + sum_j (block_j(x) - x)
            if self.dwa is not None:
                xs.append(x)
                x = self.dwa(xs)
        return self.norm_f(x)                               # (B, T, C)

    def check_length(self, n: int, cache: KVCache | None):
        if n > self.cfg.block_size:
            raise ValueError(f"{n} tokens exceed block_size={self.cfg.block_size}: crop the input "
                             f"to the last {self.cfg.block_size} tokens or start a new cache")
        if cache is not None and n > cache.max_len:
            raise ValueError(f"{n} tokens exceed the cache's max_len={cache.max_len}: "
                             f"create it with new_cache(batch_size, max_len={n}) or larger")

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = self.cfg.block_size if max_len is None else max_len
        if max_len > self.cfg.block_size:
            raise ValueError(f"max_len={max_len} exceeds block_size={self.cfg.block_size}: "
                             f"the model cannot attend further back; use max_len <= block_size")
        w = self.wte.weight                                 # slots take the embedding's device and dtype
        return KVCache([b.new_slot(batch_size, max_len, w.device, w.dtype) for b in self.applications()], max_len)

    def applications(self) -> list[nn.Module]:
        """The blocks in the order they run: the stack, n_loop times over (weights shared)."""
        return list(self.blocks) * self.cfg.n_loop

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 sample_top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy, sample_top_k
        keeps the k most likely tokens (not the MoE's cfg.top_k, the experts per token).
        Call model.eval() first, or dropout stays on. Without the cache the context slides
        (cropped to block_size); with it, T + max_new_tokens - 1 must fit in block_size.
        compile: every token after the prompt by compiled_step (a cache of block_size)."""
        need = idx.size(1) + max_new_tokens - 1             # the last sampled token is never fed
        if use_cache and need > self.cfg.block_size:
            raise ValueError(f"generating to {need + 1} tokens needs a cache of {need} > "
                             f"block_size={self.cfg.block_size}: use use_cache=False to slide the context")
        if compile and not use_cache:
            raise ValueError("compile=True decodes with the cache: drop use_cache=False")
        if use_cache:
            cache, advance = self.decoder(idx.size(0), max(need, 1), compile)
        for i in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -self.cfg.block_size:])
            elif i == 0:
                logits = self(idx, cache)                   # the prompt: eager, any length
            else:
                logits = advance(idx[:, -1:])
            idx = torch.cat([idx, sample(logits[:, -1], temperature, sample_top_k, generator)], dim=1)
        return idx

    def decoder(self, batch_size: int, max_len: int | None = None, compile: bool = False):
        """(cache, advance) to decode batch_size sequences: the prompt goes into the cache by the forward,
        model(prompt, cache), then advance(token (B, 1)) -> logits (B, 1, vocab) decodes one token into it.
        Eager: a new cache of max_len (default block_size) and the forward. compile: static_cache's cache
        (block_size long) and compiled_step, at a position counter kept on the device (no sync with the
        host per token)."""
        if not compile:
            cache = self.new_cache(batch_size, max_len)
            return cache, lambda token: self(token, cache)
        cache, step, positions = self.static_cache(batch_size), self.compiled_step(), None

        def advance(token: torch.Tensor) -> torch.Tensor:
            nonlocal positions
            if positions is None:                           # where the first decoded token goes: after the prompt
                positions = torch.full((1,), cache.pos, device=token.device)
            logits = step(token, cache, positions)
            positions.add_(1)
            cache.pos += 1
            return logits
        return cache, advance

    def static_cache(self, batch_size: int) -> KVCache:
        """compiled_step's cache for batch_size sequences: block_size long, one per batch size (and the
        model's device and dtype) for the model's life, emptied on every call. Its tensors are marked as
        keeping their addresses: CUDA graphs write into them in place (unmarked, torch.compile skips the
        graphs; a new cache per call would record them again)."""
        caches = self.__dict__.setdefault("_static_caches", {})
        key = (batch_size, self.wte.weight.device, self.wte.weight.dtype)   # the model may have moved since
        if key not in caches:
            with torch.inference_mode(False):               # kept past this call: no inference-mode tensors
                caches[key] = self.new_cache(batch_size)
            for slot in caches[key].slots:
                for t in slot or ():
                    torch._dynamo.mark_static_address(t)
        cache = caches[key]
        for slot in cache.slots:
            for t in slot or ():
                t.zero_()                                   # an SSM state is read at the prefill
        cache.pos = 0
        return cache

    def compiled_step(self):
        """self.step compiled once per model (torch.compile; on a GPU in "reduce-overhead" mode, which
        replays each step as one CUDA graph, given static_cache's cache). Its first calls compile
        (seconds to a minute); a new batch size or cache length compiles again."""
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(self.step, mode="reduce-overhead" if self.wte.weight.is_cuda else None)
        return self._compiled_step

    def num_params(self) -> int:
        n = sum(p.numel() for p in self.parameters())      # parameters() yields a tied weight once
        return n + sum(b.numel() for name, b in self.named_buffers() if name.endswith(".weight_q"))  # int8 weights

    def num_active_params(self) -> int:
        """Weights one token uses on its forward pass: an MoE layer counts top_k of its n_expert
        experts (router and shared expert included); soft MoA uses every expert. Dense: num_params."""
        return self.num_params() - sum(m.inactive_params() for m in self.modules() if hasattr(m, "inactive_params"))


def application_groups(cfg: ModelConfig, n_apps: int) -> list[list[int]]:
    """The block applications in the order they run, grouped: a block-parallel run [first, last]
    (cfg.parallel_runs) is one group, every other application a group of its own."""
    last_of = {first: last for first, last in cfg.parallel_runs}
    groups, a = [], 0
    while a < n_apps:
        groups.append(list(range(a, last_of.get(a, a) + 1)))
        a = groups[-1][-1] + 1
    return groups


def init_weights(module: nn.Module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def sample(logits: torch.Tensor, temperature: float, sample_top_k: int | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if sample_top_k is not None:
        kth = torch.topk(logits, min(sample_top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
