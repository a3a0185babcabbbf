"""ModelConfig: the one flat description of a model; `TransformerLM(cfg)` builds it.

A variant in params.yaml is a set of overrides of these fields (the `model` section, then
`pretrain.variants.<name>`). Defaults are the baseline; `__post_init__` derives sizes and
rejects impossible combinations with a message that says how to fix them.

    python -c "from components.config import ModelConfig; print(ModelConfig(block='parallel'))"
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BLOCKS = ("serial", "parallel", "parallel-unfused")
FFNS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")


@dataclass
class ModelConfig:
    vocab_size: int = 4096        # set from the tokenizer by the pretrain stage, not from params
    block_size: int = 128         # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0            # 0 -> n_head (MHA); 1 -> MQA; in between -> GQA
    n_embd: int = 128
    d_ff: int = 0                 # 0 -> 4*n_embd for gelu, the multiple of 32 nearest 8/3*n_embd for swiglu
    block: str = "serial"         # serial | parallel (PaLM, fused input matmul) | parallel-unfused
    ffn: str = "gelu"             # gelu | swiglu
    norm: str = "layernorm"       # layernorm | rmsnorm
    pos: str = "learned"          # learned | rope
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config:\n" + "\n".join(f"  - {p}" for p in problems))
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.n_embd if self.ffn == "gelu" else 32 * round(8 * self.n_embd / 3 / 32)

    def problems(self) -> list[str]:
        """Every reason this config cannot be built, each with its fix (empty if fine)."""
        p = []
        for name, allowed in (("block", BLOCKS), ("ffn", FFNS), ("norm", NORMS), ("pos", POSITIONS)):
            if getattr(self, name) not in allowed:
                p.append(f"{name}={getattr(self, name)!r} is unknown: use one of {', '.join(allowed)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
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
        return p

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}: known keys are {sorted(known)}")
        return cls(**d)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
