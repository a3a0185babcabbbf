"""Pretrain throughput through Lightning vs a plain PyTorch loop: same model, batches, optimizer.

    python -m benchmarks.lightning_vs_plain [--rounds 7] [--steps 30]

Each round times `steps` steps of each, interleaved (order alternating); a Lightning round is a
fresh Trainer.fit on the same LitLM (so its set-up cost is included). Target: within 3%.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from benchmarks.common import TRAIN, batches, median_ratio, plain_trainer, timed_steps
from components.config import ModelConfig
from components.lit import LitLM


def lightning_steps(lit: LitLM, data, start: int, n: int) -> float:
    trainer = L.Trainer(max_steps=n, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=TRAIN.grad_clip)
    loader = DataLoader(data, batch_size=None, sampler=range(start, start + n))
    t0 = time.perf_counter()
    trainer.fit(lit, train_dataloaders=loader)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = ModelConfig(vocab_size=4096, block_size=128, n_layer=4, n_embd=128, n_head=4, block="parallel",
                      ffn="swiglu", norm="rmsnorm", pos="rope")
    data = batches(cfg, args.batch_size)
    _, plain_step = plain_trainer(cfg)
    torch.manual_seed(0)
    lit = LitLM(cfg, TRAIN)
    timed_steps(plain_step, data, 0, 5)
    lightning_steps(lit, data, 0, 5)                            # warm-up both
    plain, light = [], []
    for r in range(args.rounds):
        start = 5 + r * args.steps
        for kind in (("plain", "lightning") if r % 2 else ("lightning", "plain")):
            if kind == "plain":
                plain.append(timed_steps(plain_step, data, start, args.steps)[0])
            else:
                light.append(lightning_steps(lit, data, start, args.steps))
    tokens = args.steps * args.batch_size * cfg.block_size
    print(f"d=128 4 layers, batch {args.batch_size}x128, {args.steps} steps/round, {args.rounds} rounds, "
          f"threads={torch.get_num_threads()}")
    print(f"  plain loop: median {tokens / statistics.median(plain):.0f} tokens/s")
    print(f"  Lightning:  median {tokens / statistics.median(light):.0f} tokens/s (Trainer set-up included)")
    print(f"  Lightning/plain speed ratio (median of per-round ratios): {median_ratio(plain, light):.3f}")


if __name__ == "__main__":
    main()
