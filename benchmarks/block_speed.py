"""Training tokens/s of the fused parallel block vs the unfused parallel block vs the serial block.

    python -m benchmarks.block_speed [--n-embd 128] [--rounds 7] [--steps 20]

Matched parameter counts (the blocks differ only by one norm per layer), same batches, plain
PyTorch loop (forward, backward, AdamW step), interleaved rounds after a warm-up. On a CPU the
three have the same FLOPs, so the target is "fused never slower"; PaLM's ~15% gain is an
accelerator effect (run with --device cuda where a GPU is present).
"""
from __future__ import annotations

import statistics

import torch

from benchmarks.common import batches, median_ratio, plain_trainer, shape_parser, timed_steps
from components.config import ModelConfig


def main():
    p = shape_parser(__doc__, rounds=7, steps=20)
    args = p.parse_args()
    blocks = ["serial", "parallel-unfused", "parallel"]
    cfgs = {b: ModelConfig(vocab_size=4096, block_size=128, n_layer=args.n_layer, n_embd=args.n_embd,
                           n_head=args.n_embd // 32, block=b, ffn="swiglu", norm="rmsnorm", pos="rope")
            for b in blocks}
    data = batches(cfgs["serial"], args.batch_size)
    steps = {b: plain_trainer(cfgs[b])[1] for b in blocks}
    for b in blocks:
        timed_steps(steps[b], data, 0, 5)                      # warm-up
    seconds = {b: [] for b in blocks}
    for r in range(args.rounds):
        for b in blocks[r % 3:] + blocks[:r % 3]:              # rotate the order each round
            seconds[b].append(timed_steps(steps[b], data, 5 + r * args.steps, args.steps)[0])
    tokens = args.steps * args.batch_size * cfgs["serial"].block_size
    print(f"n_embd={args.n_embd} n_layer={args.n_layer} batch={args.batch_size}x128 threads={torch.get_num_threads()}")
    for b in blocks:
        n = sum(p.numel() for p in plain_trainer(cfgs[b])[0].parameters())
        print(f"  {b:17s} {n:>9,d} params  median {tokens / statistics.median(seconds[b]):8.0f} tokens/s")
    print(f"  fused/serial   speed ratio (median of per-round ratios): {median_ratio(seconds['serial'], seconds['parallel']):.3f}")
    print(f"  fused/unfused  speed ratio (median of per-round ratios): "
          f"{median_ratio(seconds['parallel-unfused'], seconds['parallel']):.3f}")


if __name__ == "__main__":
    main()
