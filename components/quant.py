"""Int8 weights (docs/methods.md#int8): per-output-channel symmetric int8 with a float scale per channel,
and the modules that compute with them. A model whose config says `quant: int8` is built with
these modules (TransformerLM calls `quantize_int8_`), so `load_model_dir` loads it like any other.

    s_o = max_i |W[o, i]| / 127,   W_q = round(W / s) in [-127, 127] (int8),   |W - W_q * s| <= s / 2
    Int8Linear:    y = (x @ W_q^T) * s + b
    Int8Embedding: e = W_q[idx] * s[idx]          (tied: the LM head is an Int8Linear on the same W_q, s)

Two ways to compute Int8Linear, the same formula: `dequant` (the default), x @ W_q.float()^T * s,
a float copy of W_q per call; and `int8_mm`, PyTorch's fused CPU kernel `torch._weight_int8pack_mm`
(the op torchao's int8 weight-only path lowers to on CPU), which reads the int8 weights directly but
measured 3x (one token) to 40x (256 tokens) slower than fp32 on the development machine's AVX2 CPU,
where dequant was 1.1-1.5x slower than fp32. `int8_path()` says which one runs, `set_int8_path`
picks one; `benchmarks/compress.py` measures both against fp32 (pick int8_mm where it wins there).

    python -c "from components.quant import quantize_rows; import torch; print(quantize_rows(torch.randn(4, 8)))"
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PATHS = ("int8_mm", "dequant")
_path = "dequant"


def int8_path() -> str:
    """The way Int8Linear computes on CPU in this process: int8_mm (fused kernel) or dequant."""
    return _path


def set_int8_path(path: str) -> None:
    """Pick how Int8Linear computes (benchmarks compare them); int8_mm needs the kernel."""
    global _path
    if path not in PATHS or (path == "int8_mm" and not hasattr(torch, "_weight_int8pack_mm")):
        raise ValueError(f"int8 path {path!r} is not available: use one of "
                         f"{[p for p in PATHS if p != 'int8_mm' or hasattr(torch, '_weight_int8pack_mm')]}")
    _path = path


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (W_q (out, in) int8, s (out,) float32) with |w - W_q * s| <= s/2."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero row: any scale is exact
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = (x @ W_q^T) * s + b with W_q (out, in) int8 and s (out,) float32 as buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight_q, q.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @property
    def weight(self) -> torch.Tensor:
        """The float weight W_q * s this module stands for (for code that reads .weight)."""
        return self.weight_q.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _path == "int8_mm" and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).contiguous(), self.weight_q,
                                          self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)   # (..., out)
        else:
            y = F.linear(x, self.weight_q.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y


class Int8Embedding(nn.Module):
    """e = W_q[idx] * s[idx]: one int8 row and one scale per token."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.scale[:, None]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_q[idx].float() * self.scale[idx, None]   # (B, T) -> (B, T, C)


def quantize_int8_(model: nn.Module, embeddings: bool) -> nn.Module:
    """Swap, in place, every nn.Linear of `model` but lm_head for an Int8Linear of its weights; with
    `embeddings`, also wte (an Int8Embedding) and lm_head (tied: sharing wte's W_q and s)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and f"{name}.{child_name}".lstrip(".") != "lm_head":
                setattr(module, child_name, Int8Linear.from_linear(child))
    if embeddings:
        emb = Int8Embedding(*model.wte.weight.shape)
        emb.weight_q, emb.scale = quantize_rows(model.wte.weight)
        if model.cfg.tie_embeddings:
            head = Int8Linear(model.wte.weight.shape[1], model.wte.weight.shape[0], bias=False)
            head.weight_q, head.scale = emb.weight_q, emb.scale    # one tensor, two modules
        else:
            head = Int8Linear.from_linear(model.lm_head)
        model.wte, model.lm_head = emb, head
    return model
