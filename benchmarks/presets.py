"""Training and decode tokens/s of every preset at matched parameter count, as ratios to serial.

    python -m benchmarks.presets [--n-embd 128] [--n-layer 4] [--rounds 5] [--steps 10] [--decode-tokens 32]

Matched parameters: each preset whose default sizes miss serial's parameter count by more than
0.1% (par, hybrid) gets the d_ff (a multiple of 8) that comes nearest; the others need nothing
(looped repeats blocks: more compute, no weights; DWA adds L(L+3)/2 scalars; one-wide-ffn's
default width is n_layer times serial's, the same FFN weights). Training: same batches, plain
PyTorch loop (forward, backward, AdamW step). Decode: batch 1, a `--prompt-tokens` prefill, then
`--decode-tokens` cached one-token steps (keys/values, SSM state). Presets run in interleaved
rounds in rotating order after a warm-up; a ratio is the median of per-round ratios.
"""
from __future__ import annotations

import statistics

import torch

from benchmarks.common import batches, decode_seconds, median_ratio, plain_trainer, shape_parser, timed_steps
from components.config import PRESETS, ModelConfig
from components.model import TransformerLM


def n_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):                              # sizes only, no memory, no init
        return TransformerLM(cfg).num_params()


def matched(name: str, base: dict, target: int) -> ModelConfig:
    """The preset's config, with the d_ff nearest `target` parameters if its default misses by > 0.1%."""
    cfg = ModelConfig.from_preset(name, **base)
    if abs(n_params(cfg) - target) <= target / 1000:
        return cfg
    p1, p2 = (n_params(ModelConfig.from_preset(name, **{**base, "d_ff": d})) for d in (64, 128))
    d_ff = 64 + (target - p1) * 64 / (p2 - p1)             # the parameter count is affine in d_ff
    return ModelConfig.from_preset(name, **{**base, "d_ff": max(8, 8 * round(d_ff / 8))})



def main():
    p = shape_parser(__doc__, rounds=5, steps=10)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = p.parse_args()
    names = ["serial"] + [n for n in args.presets if n != "serial"]
    base = dict(vocab_size=4096, block_size=128, n_layer=args.n_layer, n_embd=args.n_embd,
                n_head=args.n_embd // 32, ffn="swiglu", norm="rmsnorm", pos="rope")
    target = n_params(ModelConfig(**base))
    cfgs = {n: matched(n, base, target) for n in names}
    data = batches(cfgs["serial"], args.batch_size)
    trainers = {n: plain_trainer(cfgs[n]) for n in names}   # (model, step)
    prompt = torch.randint(0, base["vocab_size"], (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    for n in names:                                          # warm-up
        timed_steps(trainers[n][1], data, 0, 3)
        decode_seconds(trainers[n][0].eval(), prompt, 4)
    train, decode = {n: [] for n in names}, {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:                      # rotate the order each round
            model, step = trainers[n]
            train[n].append(timed_steps(step, data, 3 + r * args.steps, args.steps)[0])
            decode[n].append(decode_seconds(model.eval(), prompt, args.decode_tokens))
            model.train()
    tokens = args.steps * args.batch_size * base["block_size"]
    print(f"n_embd={args.n_embd} n_layer={args.n_layer} batch={args.batch_size}x{base['block_size']} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}; serial has {target:,d} params")
    print(f"| preset | params | d_ff | train tok/s | train x serial | decode tok/s | decode x serial |")
    print(f"|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {n_params(cfgs[n]):,d} | {cfgs[n].d_ff} "
              f"| {tokens / statistics.median(train[n]):,.0f} | {median_ratio(train['serial'], train[n]):.2f} "
              f"| {args.decode_tokens / statistics.median(decode[n]):,.0f} "
              f"| {median_ratio(decode['serial'], decode[n]):.2f} |")


if __name__ == "__main__":
    main()
