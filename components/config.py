"""ModelConfig: the one flat description of a model; `TransformerLM(cfg)` builds it. PRESETS: the
seed papers' block designs by name.

A variant in params.yaml is a set of overrides of these fields, resolved as ModelConfig defaults
<- the `model` section <- the variant's `preset` <- the variant's own keys. Defaults are the
baseline; `__post_init__` derives sizes and rejects impossible combinations with a message that
says how to fix them.

    python -c "from components.config import ModelConfig; print(ModelConfig.from_preset('par', n_layer=6))"
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields

# serial | parallel (PaLM, fused input matmul) | parallel-unfused (GPT-J) | parallel-2norm (GPT-NeoX)
# | par (a stack of s/f sublayers, see `layout`) | one-wide-ffn (one FFN shared by all layers)
# | hybrid (attention heads and SSM heads side by side, Hymba / Falcon-H1)
BLOCKS = ("serial", "parallel", "parallel-unfused", "parallel-2norm", "par", "one-wide-ffn", "hybrid")
FFNS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
ROUTERS = ("topk-softmax", "softmax-topk")          # MoE router conventions (components/model.py)
MOAS = ("kv-experts", "kv-shared")                  # mixture-of-attention parameterisations (BAM)
MOE_BLOCKS = ("serial", "parallel", "parallel-unfused")   # blocks that take an MoE FFN
MOA_BLOCKS = ("parallel", "parallel-unfused")       # attention and FFN experts on the same normalised input
PER_LAYER_BLOCKS = ("serial", "parallel", "parallel-2norm")   # blocks whose layers may differ in width

# The seed papers' designs. A variant says `preset: <name>` and may override any field after it.
PRESETS = {
    "serial": {"block": "serial"},                  # pre-norm GPT-2/Llama
    "parallel": {"block": "parallel"},              # PaLM/GPT-J: x + Attn(LN x) + FFN(LN x), one fused matmul
    "parallel-2norm": {"block": "parallel-2norm"},  # GPT-NeoX: x + Attn(LN1 x) + FFN(LN2 x)
    "par": {"block": "par"},                        # arXiv:2009.04534; layout "" -> par_layout(n_layer)
    "one-wide-ffn": {"block": "one-wide-ffn"},      # arXiv:2309.01826; d_ff 0 -> n_layer * the default
    "denseformer": {"block": "serial", "dwa": True},  # arXiv:2402.02622, depth-weighted averaging
    "looped": {"block": "serial", "n_loop": 2},     # the n_layer blocks applied twice, weights shared
    "hybrid": {"block": "hybrid"},                  # Hymba (arXiv:2411.13676) / Falcon-H1 hybrid heads
}


@dataclass
class ModelConfig:
    vocab_size: int = 4096        # set from the tokenizer by the pretrain stage, not from params
    block_size: int = 128         # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0            # 0 -> n_head (MHA); 1 -> MQA; in between -> GQA
    n_embd: int = 128
    d_ff: int = 0                 # 0 -> 4*n_embd for gelu, the multiple of 32 nearest 8/3*n_embd for swiglu
                                  #      (one-wide-ffn: n_layer times that, the serial model's FFN weights)
    block: str = "serial"         # one of BLOCKS
    ffn: str = "gelu"             # gelu | swiglu
    norm: str = "layernorm"       # layernorm | rmsnorm
    pos: str = "learned"          # learned | rope
    rope_base: float = 10000.0
    rotary_pct: float = 1.0       # rope: the fraction of each head's channels rotated (GPT-NeoX 0.25); the rest pass
    tie_embeddings: bool = True
    bias: bool = False
    norm_bias: bool = False       # layernorm: a bias even with bias: false (Falcon: linears without, norms with)
    qkv_bias: bool = False        # a bias on the q, k, v projection only, with bias: false (Qwen2)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    # Mixture-of-Experts (components/model.py): made by upcycle@, or set on a variant to train one from scratch.
    n_expert: int = 0             # FFN experts of an MoE layer; 0 = dense FFN
    top_k: int = 2                # experts each token uses
    router: str = "topk-softmax"  # topk-softmax: softmax of the top-k logits (Mixtral) | softmax-topk (Switch)
    moe_every: int = 1            # layer i (from 0) is MoE when (i + 1) % moe_every == 0: 1 all, 2 every other
    shared_expert: bool = False   # plus one dense FFN that every token uses
    aux_loss_coef: float = 0.01   # Switch load-balancing loss weight (of its mean over MoE layers)
    z_loss_coef: float = 0.001    # router z-loss weight (ST-MoE), same averaging
    n_attn_expert: int = 0        # mixture-of-attention experts (BAM, soft routing); 0 = plain attention
    moa: str = "kv-experts"       # kv-experts: own q, k, v, o each | kv-shared: own q, o; one k, v (one cache)
    layout: str = ""              # par: sublayers, s = attention, f = FFN, 2*n_layer letters; "" -> par_layout(n_layer)
    n_loop: int = 1               # apply the stack of blocks n_loop times, weights shared (looped)
    dwa: bool = False             # DenseFormer depth-weighted average after blocks
    dwa_dilation: int = 1         # DWA after block i averages the outputs j = i, i-k, i-2k, ... (k = dilation)
    dwa_period: int = 1           # DWA after every p-th block only
    d_state: int = 16             # hybrid: SSM state size per head
    # Written by compress@ (not set in params.yaml): per-layer widths of pruned or fused models
    # (empty = every layer n_head/n_kv_head/d_ff wide; a layer with 0 heads is an FFN-only layer),
    # block-parallel runs [first, last] of layers that all read the run's input, x + sum_j (block_j(x) - x)
    # (FFN Fusion's block parallelism, docs/methods.md#ffn-fusion), and int8 weights ("" = float;
    # quant_embeddings: the embedding and LM head are int8 too).
    layer_n_head: list[int] = field(default_factory=list)
    layer_n_kv_head: list[int] = field(default_factory=list)
    layer_d_ff: list[int] = field(default_factory=list)
    parallel_runs: list[list[int]] = field(default_factory=list)
    quant: str = ""
    quant_embeddings: bool = False

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config:\n" + "\n".join(f"  - {p}" for p in problems))
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.n_embd if self.ffn == "gelu" else 32 * round(8 * self.n_embd / 3 / 32)
            if self.block == "one-wide-ffn":
                self.d_ff *= self.n_layer
        if self.block == "par" and not self.layout:
            self.layout = par_layout(self.n_layer)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """defaults <- PRESETS[name] <- overrides."""
        if problems := preset_problems(name):
            raise ValueError(problems[0])
        return cls(**merge_preset({}, name, overrides))

    def problems(self) -> list[str]:
        """Every reason this config cannot be built, each with its fix (empty if fine)."""
        p = []
        for name, allowed in (("block", BLOCKS), ("ffn", FFNS), ("norm", NORMS), ("pos", POSITIONS)):
            if getattr(self, name) not in allowed:
                p.append(f"{name}={getattr(self, name)!r} is unknown: use one of {', '.join(allowed)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_loop",
                     "dwa_dilation", "dwa_period", "d_state"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("n_kv_head", "d_ff"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} must be >= 0 (0 picks the default)")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            p.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                     f"pick n_head among {divisors(self.n_embd)}")
        if self.n_head >= 1 and self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            p.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                     f"pick n_kv_head among {divisors(self.n_head)}")
        if self.pos == "rope" and self.n_head >= 1 and (self.n_embd // self.n_head) % 2:
            p.append(f"rope needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        return p + self.position_problems() + self.stack_problems() + self.compressed_problems() + self.moe_problems()

    def position_problems(self) -> list[str]:
        """Problems of rotary_pct, norm_bias and qkv_bias (what Hugging Face checkpoints need, components/hf.py)."""
        p = []
        if not 0.0 < self.rotary_pct <= 1.0:
            p.append(f"rotary_pct={self.rotary_pct} must be in (0, 1]: the fraction of each head's channels rotated")
        elif self.rotary_pct != 1.0 and self.pos != "rope":
            p.append(f"rotary_pct={self.rotary_pct} is only read with pos: rope: set pos: rope or remove it")
        elif self.rotary_pct != 1.0 and self.n_head >= 1 and (self.rope_dim % 2 or self.rope_dim < 2):
            p.append(f"rotary_pct={self.rotary_pct} rotates {self.rope_dim} of {self.head_size} channels per head: "
                     f"pick rotary_pct so that head_size * rotary_pct is even and >= 2")
        if self.norm_bias and (self.norm != "layernorm" or self.bias):
            p.append("norm_bias is only read with norm: layernorm and bias: false (bias: true gives norms a bias "
                     "already): remove it")
        if self.qkv_bias and (self.bias or self.block in ("parallel", "hybrid") or self.n_attn_expert):
            p.append("qkv_bias is only read with bias: false by a separate attention module (not block parallel's "
                     "fused input matmul, hybrid or n_attn_expert): remove it, or use block parallel-unfused")
        return p

    def stack_problems(self) -> list[str]:
        """Problems of the fields only some presets read (layout, dwa_*, d_state); a value nothing
        reads would be a silent no-op, so it is reported too."""
        p = []
        if self.layout and self.block != "par":
            p.append(f"layout={self.layout!r} is only read by block=par: set it on par variants only")
        if self.layout and set(self.layout) - {"s", "f"}:
            p.append(f"layout={self.layout!r} has letters other than s and f: write an attention sublayer "
                     f"as s and an FFN sublayer as f, e.g. {par_layout(max(self.n_layer, 1))!r}")
        elif self.layout and len(self.layout) != 2 * self.n_layer:
            p.append(f"layout={self.layout!r} has {len(self.layout)} sublayers but n_layer={self.n_layer} "
                     f"needs {2 * self.n_layer} (two per layer), e.g. {par_layout(max(self.n_layer, 1))!r}")
        if not self.dwa and (self.dwa_dilation, self.dwa_period) != (1, 1):
            p.append("dwa_dilation and dwa_period are only read with dwa: true: set them on denseformer variants only")
        if self.dwa and self.n_layer >= 1 and self.n_loop >= 1 and self.dwa_period > self.n_layer * self.n_loop:
            p.append(f"dwa_period={self.dwa_period} exceeds the {self.n_layer * self.n_loop} block applications: "
                     f"no DWA would run; pick dwa_period <= {self.n_layer * self.n_loop}")
        if self.block != "hybrid" and self.d_state != ModelConfig.d_state:
            p.append(f"d_state={self.d_state} is only read by block=hybrid: set it on hybrid variants only")
        return p

    def moe_problems(self) -> list[str]:
        """Problems of the MoE/MoA fields; MoE-only options set on a dense model are reported too."""
        p = []
        for name, allowed in (("router", ROUTERS), ("moa", MOAS)):
            if getattr(self, name) not in allowed:
                p.append(f"{name}={getattr(self, name)!r} is unknown: use one of {', '.join(allowed)}")
        for name in ("n_expert", "n_attn_expert", "aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} must be >= 0")
        moe_only = ("top_k", "router", "moe_every", "shared_expert", "aux_loss_coef", "z_loss_coef")
        if self.n_expert <= 0:
            p += [f"{name}={getattr(self, name)!r} is only read with n_expert >= 1: set n_expert or remove it"
                  for name in moe_only if getattr(self, name) != getattr(ModelConfig, name)]
        else:
            if not 1 <= self.top_k <= self.n_expert:
                p.append(f"top_k={self.top_k} must be between 1 and n_expert={self.n_expert}")
            if not 1 <= self.moe_every <= max(self.n_layer, 1):
                p.append(f"moe_every={self.moe_every} must be between 1 and n_layer={self.n_layer}")
            if self.top_k == 1 and self.router == "topk-softmax":
                p.append("top_k=1 with router=topk-softmax weighs every token's expert 1: the router would learn "
                         "from the aux losses only; use router: softmax-topk (Switch) for top-1")
            if self.block not in MOE_BLOCKS or self.n_loop != 1:
                p.append(f"n_expert needs block in {MOE_BLOCKS} and n_loop 1, got block={self.block}, "
                         f"n_loop={self.n_loop}")
        if self.n_attn_expert > 0 and self.block not in MOA_BLOCKS:
            p.append(f"n_attn_expert (mixture of attention) needs a one-norm parallel block {MOA_BLOCKS}, "
                     f"got block={self.block}")
        if self.n_attn_expert > 0 and self.n_loop != 1:
            p.append(f"n_attn_expert needs n_loop 1, got {self.n_loop}")
        if self.n_attn_expert <= 0 and self.moa != ModelConfig.moa:
            p.append(f"moa={self.moa!r} is only read with n_attn_expert >= 1: set n_attn_expert or remove it")
        if (self.n_expert > 0 or self.n_attn_expert > 0) and (self.layer_n_head or self.layer_d_ff):
            p.append("per-layer widths (layer_n_head/layer_d_ff, from pruning) are not supported with MoE or "
                     "mixture of attention: upcycle the unpruned model, or prune a dense one")
        return p

    def compressed_problems(self) -> list[str]:
        """Problems of the fields compress@ writes (per-layer widths, int8)."""
        p, lists = [], (self.layer_n_head, self.layer_n_kv_head, self.layer_d_ff)
        if self.quant not in ("", "int8"):
            p.append(f"quant={self.quant!r} is unknown: use '' (float) or 'int8'")
        if self.quant_embeddings and self.quant != "int8":
            p.append("quant_embeddings is only read with quant: int8")
        if self.parallel_runs and (self.block == "par" or self.n_loop != 1 or self.dwa):
            p.append(f"parallel_runs need a stack of layers run once (not block par, n_loop or dwa), got "
                     f"block={self.block}, n_loop={self.n_loop}, dwa={self.dwa}")
        p += run_problems(self.n_layer, self.parallel_runs, "parallel_runs")
        if not any(lists):
            return p
        if any(len(widths) != self.n_layer for widths in lists):
            p.append(f"layer_n_head, layer_n_kv_head and layer_d_ff need n_layer={self.n_layer} entries each, "
                     f"got {[len(widths) for widths in lists]}")
        if self.block not in PER_LAYER_BLOCKS or self.n_loop != 1 or self.dwa:
            p.append(f"per-layer widths need block in {PER_LAYER_BLOCKS} without n_loop or dwa, got block={self.block}")
        for i, (nh, nkv, d_ff) in enumerate(zip(*lists)):
            if nh < 0 or d_ff < 1 or (nh and (nkv < 1 or nh % nkv)) or (not nh and nkv):
                p.append(f"layer {i}: n_head={nh}, n_kv_head={nkv}, d_ff={d_ff} is impossible: d_ff >= 1 "
                         f"and n_kv_head divides n_head (both 0 for an FFN-only layer)")
        return p

    def layer_widths(self, i: int) -> tuple[int, int, int]:
        """(n_head, n_kv_head, d_ff) of layer i: its own with per-layer widths, else the model's."""
        if self.layer_d_ff:
            return self.layer_n_head[i], self.layer_n_kv_head[i], self.layer_d_ff[i]
        return self.n_head, self.n_kv_head, self.d_ff

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_dim(self) -> int:
        """Channels of each head that rope rotates: the first int(head_size * rotary_pct) (GPT-NeoX's rule)."""
        return int(self.head_size * self.rotary_pct)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}: known keys are {sorted(known)}")
        return cls(**d)


def run_problems(n_layer: int | None, runs: list[list[int]], name: str) -> list[str]:
    """Each run [first, last] names two or more consecutive existing layers; runs are disjoint
    (n_layer None: the depth is not known yet). `name`: the field or option that holds them."""
    p, used = [], set()
    last = n_layer - 1 if n_layer is not None else None
    for run in runs:
        if len(run) != 2 or not 0 <= run[0] < run[1] or (last is not None and run[1] > last):
            p.append(f"{name}: {run} is not a run of the layers: a run is [first, last] with 0 <= first < last"
                     + (f" <= {last} (n_layer={n_layer})" if last is not None else "") + ", e.g. [0, 1]")
        elif used & set(range(run[0], run[1] + 1)):
            p.append(f"{name}: {run} overlaps another run: give disjoint runs, e.g. [0, 1] and [2, 3]")
        else:
            used |= set(range(run[0], run[1] + 1))
    return p


def par_layout(n_layer: int) -> str:
    """PAR's default: keep ceil(n_layer/3) attention sublayers (PAR replaced ~63% of them), each
    followed by an FFN, at the start; the rest FFNs. 4 -> 'sfsfffff', 2 -> 'sfff', 6 -> 'sfsf' + 8*'f'."""
    n_attn = math.ceil(n_layer / 3)
    return "sf" * n_attn + "f" * (2 * n_layer - 2 * n_attn)


def merge_preset(base: dict, preset: str | None, own: dict) -> dict:
    """The field values of base <- PRESETS[preset] <- own: the one place presets are applied (to
    from_preset and to params.yaml's variants and students). No preset, or an unknown one (which
    preset_problems names), adds nothing."""
    return {**base, **PRESETS.get(preset, {}), **own}


def preset_problems(name: str) -> list[str]:
    if name in PRESETS:
        return []
    hint = difflib.get_close_matches(name, PRESETS, n=1)
    return [f"preset={name!r} is unknown: " + (f"did you mean {hint[0]!r}? " if hint else "")
            + f"presets are {', '.join(PRESETS)}"]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
