"""The recurrence of the hybrid block's SSM heads, in plain PyTorch: a chunked scan for training
and prefill, a one-token step for generation. No parameters here; HybridMixer (model.py) owns them.

Per head, a diagonal linear recurrence with a scalar input-dependent decay (Mamba-2's SSD with
A = -1, no short convolution): state H_t (N, P), input x_t (P), B_t, C_t (N), a_t in (0, 1),

    H_t = a_t H_{t-1} + B_t x_tᵀ        y_t = H_tᵀ C_t

so y_t = sum_{s<=t} (C_t·B_s) (a_{s+1}···a_t) x_s + (a_1···a_t) H_0ᵀ C_t. The scan evaluates that
sum chunk by chunk: inside a chunk as a masked (L, L) matrix whose decays exp(cum_t - cum_s) come
from a cumulative sum of log a (log space: every factor is <= 1, nothing overflows), across
chunks through the carried state.

    python -c "import torch; from components.ssm import ssd_scan; print(ssd_scan(torch.randn(1,2,9,4), -torch.rand(1,2,9), torch.randn(1,9,3), torch.randn(1,9,3), torch.zeros(1,2,3,4))[0].shape)"
"""
from __future__ import annotations

import torch


def ssd_scan(x, log_a, Bm, Cm, h0, chunk: int = 32):
    """x (B, nh, T, P), log_a (B, nh, T) <= 0, Bm and Cm (B, T, N) shared by the heads,
    h0 (B, nh, N, P) -> y (B, nh, T, P), the final state (B, nh, N, P)."""
    T, h, ys = x.size(2), h0, []
    for c in range(0, T, chunk):
        xc, la = x[:, :, c:c + chunk], log_a[:, :, c:c + chunk]             # (B, nh, L, P), (B, nh, L)
        Bc, Cc = Bm[:, None, c:c + chunk], Cm[:, None, c:c + chunk]         # (B, 1, L, N)
        L = la.size(-1)
        cum = la.cumsum(-1)                                                 # (B, nh, L): log a_1···a_t
        seg = cum[..., :, None] - cum[..., None, :]                         # (B, nh, L, L): log a_{s+1}···a_t
        past = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()   # s <= t
        decay = seg.masked_fill(~past, float("-inf")).exp()                 # 0 above the diagonal
        scores = (Cc @ Bc.transpose(-1, -2)) * decay                        # (B, nh, L, L): (C_t·B_s) a_{s+1}···a_t
        ys.append(scores @ xc + cum.exp()[..., None] * (Cc @ h))           # (B, nh, L, P)
        to_end = (cum[..., -1:] - cum).exp()[..., None]                     # (B, nh, L, 1): a_{s+1}···a_L
        h = cum[..., -1, None, None].exp() * h + (Bc * to_end).transpose(-1, -2) @ xc  # (B, nh, N, P)
    return torch.cat(ys, dim=2), h


def ssd_step(x, log_a, Bm, Cm, h):
    """One token: x (B, nh, 1, P), log_a (B, nh, 1), Bm and Cm (B, 1, N), h (B, nh, N, P)
    -> y (B, nh, 1, P), the new state (B, nh, N, P)."""
    h = log_a.exp()[..., None] * h + Bm[:, None].transpose(-1, -2) @ x     # a_t H + B_t x_tᵀ
    return Cm[:, None] @ h, h                                               # (B, 1, 1, N) @ (B, nh, N, P)
