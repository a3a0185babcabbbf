"""bf16-mixed vs fp32 training on CPU: tokens/s, and the loss after the same steps on the same batches.

    python -m benchmarks.bf16 [--n-embd 64 128 192 256 384 512 768] [--rounds 3] [--steps 4]

bf16-mixed is torch.autocast("cpu", bfloat16) around the forward, which is what Lightning's
`precision: bf16-mixed` does; weights and optimizer stay fp32. Without bf16 matrix hardware
(AVX512-BF16 / AMX) bf16 matmuls are emulated and much slower: check before choosing it.

The sweep over widths ends with the crossover: the smallest width from which every wider one measured
bf16-mixed faster. `train.precision: auto` uses bf16-mixed from components/device.py's BF16_MIN_WIDTH
on, a crossover measured with this script (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import statistics


from benchmarks.common import batches, median_ratio, plain_trainer, timed_steps
from components.config import ModelConfig
from components.device import BF16_MIN_WIDTH


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, nargs="+", default=[64, 128, 192, 256, 384, 512, 768])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    speedup = {}
    for d in args.n_embd:
        cfg = ModelConfig(vocab_size=4096, block_size=128, n_layer=4, n_embd=d, n_head=d // 32,
                          block="parallel", ffn="swiglu", norm="rmsnorm", pos="rope")
        data = batches(cfg, args.batch_size)
        steps = {prec: plain_trainer(cfg, prec)[1] for prec in ("32-true", "bf16-mixed")}
        seconds, loss = {k: [] for k in steps}, {}
        for r in range(args.rounds + 1):                        # round 0 is the warm-up
            for prec in (list(steps) if r % 2 else list(steps)[::-1]):
                dt, loss[prec] = timed_steps(steps[prec], data, r * args.steps, args.steps)
                if r:
                    seconds[prec].append(dt)
        tokens = args.steps * args.batch_size * cfg.block_size
        n_steps = (args.rounds + 1) * args.steps
        speedup[d] = median_ratio(seconds['32-true'], seconds['bf16-mixed'])
        print(f"n_embd={d}: fp32 {tokens / statistics.median(seconds['32-true']):.0f} tok/s, "
              f"bf16-mixed {tokens / statistics.median(seconds['bf16-mixed']):.0f} tok/s, "
              f"speed-up {median_ratio(seconds['32-true'], seconds['bf16-mixed']):.2f}x; "
              f"loss after {n_steps} steps: fp32 {loss['32-true']:.4f}, bf16-mixed {loss['bf16-mixed']:.4f}", flush=True)

    gains = [d for d in sorted(speedup) if all(speedup[w] > 1 for w in speedup if w >= d)]
    print(f"crossover: bf16-mixed faster from n_embd {gains[0]} on" if gains else
          "crossover: bf16-mixed was not faster at the widest n_embd measured",
          f"(components/device.py BF16_MIN_WIDTH = {BF16_MIN_WIDTH})")


if __name__ == "__main__":
    main()
