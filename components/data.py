"""Token files -> training batches. The batch of optimizer step s is a pure function of (seed, s).

That makes a resumed run see exactly the batches an uninterrupted one would, whatever the
number of devices: each rank takes its slice of the same global batch.

    ds = StepBatches(load_tokens("data/prepared"), block_size=128, batch_size=16, seed=1337)
    x, y = ds[41]                                      # the (B, T) inputs and targets of step 41
No Lightning here: evaluation imports this too.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from components.errors import ParamsError


def load_tokens(prepared: str | Path, split: str = "train") -> np.memmap:
    """The token ids of a split ('train', 'val', 'domains/<name>/train', ...) as a read-only memmap.
    A missing or truncated token file (its size is not what meta.json counts) is one ParamsError."""
    prepared = Path(prepared)
    path, fix = prepared / f"{split}.bin", (f"restore it with `dvc checkout --force {prepared}`, or rebuild it with "
                                            f"`dvc repro -f prepare`")
    try:
        meta = json.loads((prepared / "meta.json").read_text())
        parts = split.split("/")                 # 'val', or 'domains/<name>/val'
        expected = (meta["domains"][parts[1]] if len(parts) == 3 else meta)[f"{parts[-1]}_tokens"]
        dtype = np.dtype(meta["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ParamsError(f"{prepared / 'meta.json'} is missing or damaged ({type(e).__name__}: {e}): {fix}") from None
    size = path.stat().st_size if path.is_file() else None
    if size != expected * dtype.itemsize:
        problem = "is missing" if size is None else f"has {size:,} bytes, not {expected:,} tokens x {dtype.itemsize}"
        raise ParamsError(f"{path} {problem} (as {prepared / 'meta.json'} records): {fix}")
    return np.memmap(path, dtype=dtype, mode="r")


def window_batch(tokens: np.ndarray, offsets, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `offsets`: two (B, T) int64 tensors."""
    rows = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


class StepBatches(Dataset):
    """Item s is the batch of optimizer step s: random windows drawn from a generator seeded by
    (seed, s); with world_size > 1 each rank gets its contiguous slice of the global batch."""

    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world_size=1):
        if batch_size % world_size:
            raise ParamsError(f"train.batch_size={batch_size} is not divisible by the {world_size} devices")
        if len(tokens) <= block_size + 1:
            raise ParamsError(f"only {len(tokens)} training tokens, not more than block_size+1={block_size + 1}: "
                              f"use a bigger corpus or a smaller model.block_size")
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __getitem__(self, step):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        offsets = torch.randint(0, len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=g)
        per_rank = self.batch_size // self.world_size
        return window_batch(self.tokens, offsets[self.rank * per_rank:(self.rank + 1) * per_rank].tolist(),
                            self.block_size)


class StepsFrom(Sampler):
    """Steps start(), start()+1, ... without end (training stops at max_steps). `start` is read when
    an iteration begins, so a run resumed at step s draws the batches of steps s, s+1, ... exactly
    as an uninterrupted run would."""

    def __init__(self, start):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start())


def eval_offsets(n_tokens: int, block_size: int, count: int) -> list[int]:
    """`count` windows spread evenly over a token file (fixed, so every eval sees the same text)."""
    last = n_tokens - block_size - 1
    if last < 0:
        raise ValueError(f"only {n_tokens} validation tokens, fewer than block_size+1={block_size + 1}: "
                         f"raise data.val_fraction or lower block_size")
    return np.linspace(0, last, count).astype(np.int64).tolist()
