"""Training tokens/s of the fused parallel block vs the unfused parallel block vs the serial block.

    python -m benchmarks.block_speed [--n-embd 128] [--rounds 7] [--steps 20]
    python -m benchmarks.block_speed --device cuda --precision bf16-mixed --compile --n-embd 1024 --n-layer 8

Matched parameter counts (the blocks differ only by one norm per layer), same batches, plain
PyTorch loop (forward, backward, AdamW step), interleaved rounds after a warm-up. On a CPU the
three have the same FLOPs, so the target is "fused never slower"; PaLM's ~15% gain is an
accelerator effect (run with --device cuda where a GPU is present: PaLM's claim, >= 1.10x at d >= 1024).
"""
from __future__ import annotations

import statistics

from benchmarks.common import batches, compiled, device_line, median_ratio, plain_trainer, shape_parser, timed_steps
from components.config import ModelConfig


def main():
    p = shape_parser(__doc__, rounds=7, steps=20)
    p.add_argument("--blocks", nargs="+", default=["serial", "parallel-unfused", "parallel"],
                   choices=["serial", "parallel-unfused", "parallel"])
    args = p.parse_args()
    blocks = ["serial"] + [b for b in args.blocks if b != "serial"]
    head_size = 32 if args.n_embd < 512 else 128
    cfgs = {b: ModelConfig(vocab_size=4096, block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd,
                           n_head=args.n_embd // head_size, block=b, ffn="swiglu", norm="rmsnorm", pos="rope")
            for b in blocks}
    data = batches(cfgs["serial"], args.batch_size)
    trainers = {b: plain_trainer(cfgs[b], args.precision, device=args.device, compile=args.compile) for b in blocks}
    steps = {b: trainers[b][1] for b in blocks}
    for b in blocks:
        timed_steps(steps[b], data, 0, 5)                      # warm-up (and compilation)
    seconds = {b: [] for b in blocks}
    for r in range(args.rounds):
        for b in blocks[r % len(blocks):] + blocks[:r % len(blocks)]:   # rotate the order each round
            seconds[b].append(timed_steps(steps[b], data, 5 + r * args.steps, args.steps)[0])
    tokens = args.steps * args.batch_size * args.block_size
    print(f"{device_line(args.device)}; {args.precision}{compiled(args.compile)}")
    print(f"n_embd={args.n_embd} n_layer={args.n_layer} n_head={cfgs['serial'].n_head} "
          f"batch={args.batch_size}x{args.block_size}, {args.rounds} rounds x {args.steps} steps")
    for b in blocks:
        n = sum(p.numel() for p in trainers[b][0].parameters())
        print(f"  {b:17s} {n:>9,d} params  median {tokens / statistics.median(seconds[b]):8.0f} tokens/s")
    for b in blocks[1:]:
        print(f"  {b}/serial speed ratio (median of per-round ratios): {median_ratio(seconds['serial'], seconds[b]):.3f}")
    if {"parallel", "parallel-unfused"} <= set(blocks):
        print(f"  parallel/parallel-unfused speed ratio: {median_ratio(seconds['parallel-unfused'], seconds['parallel']):.3f}")


if __name__ == "__main__":
    main()
