"""Training step time of MoE and mixture-of-attention models vs their dense parent, and decode
tokens/s of each kind of upcycled model.

    python -m benchmarks.moe [--n-embd 128] [--rounds 5] [--steps 10]
    python -m benchmarks.moe --quick        # tiny shapes, one short round: checks that it runs
    python -m benchmarks.moe --device cuda --precision bf16-mixed --compile --contenders sparse --no-decode
    python -m benchmarks.moe --dispatch grouped  # on a CPU: grouped matmuls instead of the loop over experts

The default study's shapes (parallel block, 4 layers, d=128, SwiGLU, vocab 4096, batch 16 x 128).
Contenders, all with the parent's dense weights' shapes:
  dense         the parallel parent (what `continue` trains)
  sparse        E=4 experts, top-2, every layer (what `sparse` makes; target: <= 1.8x dense's step on a
                CPU, <= 1.6x on a GPU)
  btx           E=3, top-2 (two branches and the parent)
  moa           3 soft attention experts (kv-experts), dense FFN: soft MoA vs plain attention
  bam           btx's MoE + 3 attention experts (kv-experts)
  bam-kv-shared bam with shared k/v (one KV cache)
Training: plain PyTorch steps (forward, LM + weighted aux losses, backward, AdamW), interleaved
rounds, ratios as the median of per-round ratios. Decode: batch 1, a 64-token prefill, then 32
cached single-token steps, median over rounds.
"""
from __future__ import annotations

import statistics

import torch

from benchmarks.common import batches, compiled, decode_seconds, device_line, median_ratio, plain_trainer, shape_parser, timed_steps
from components import model as model_mod
from components.config import ModelConfig

CONTENDERS = {
    "dense": {},
    "sparse": dict(n_expert=4, top_k=2),
    "btx": dict(n_expert=3, top_k=2),
    "moa": dict(n_attn_expert=3),
    "bam": dict(n_expert=3, top_k=2, n_attn_expert=3),
    "bam-kv-shared": dict(n_expert=3, top_k=2, n_attn_expert=3, moa="kv-shared"),
}


def main():
    p = shape_parser(__doc__, rounds=5, steps=10)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--no-decode", action="store_true", help="time training steps only")
    p.add_argument("--dispatch", default=None, choices=["grouped", "loop"],
                   help="the experts as grouped matmuls (where torch has them; archflow's choice on a GPU) or "
                        "in a loop over experts (archflow's choice on a CPU)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and one short round (a smoke check)")
    args = p.parse_args()
    if args.quick:
        args.n_embd, args.n_layer, args.batch_size, args.rounds, args.steps = 32, 2, 4, 1, 2
    if args.dispatch:
        model_mod.GROUPED_MM_DEVICES = (torch.device(args.device).type,) if args.dispatch == "grouped" else ()
    head_size = 32 if args.n_embd < 512 else 128
    base = dict(vocab_size=4096 if not args.quick else 256, block_size=args.block_size, n_layer=args.n_layer,
                n_embd=args.n_embd, n_head=max(args.n_embd // head_size, 1), block="parallel", ffn="swiglu",
                norm="rmsnorm", pos="rope")
    names = ["dense"] + [n for n in args.contenders if n != "dense"]
    cfgs = {name: ModelConfig(**base, **CONTENDERS[name]) for name in names}
    data = batches(cfgs["dense"], args.batch_size)
    trainers = {n: plain_trainer(cfgs[n], args.precision, device=args.device, compile=args.compile) for n in names}
    for n in names:
        timed_steps(trainers[n][1], data, 0, 3)                 # warm-up (and compilation)
    train_s, decode_s = {n: [] for n in names}, {n: [] for n in names}
    prompt = torch.randint(0, base["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0)).to(args.device)
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:   # rotate the order each round
            train_s[n].append(timed_steps(trainers[n][1], data, 3 + r * args.steps, args.steps)[0])
            if args.no_decode:
                continue
            model = trainers[n][0].eval()
            decode_seconds(model, prompt, 4)                    # warm-up
            decode_s[n].append(decode_seconds(model, prompt, 32))
            model.train()
    grouped = model_mod.GROUPED_MM and torch.device(args.device).type in model_mod.GROUPED_MM_DEVICES
    print(f"{device_line(args.device)}; {args.precision}{compiled(args.compile)}; experts "
          f"{'as grouped matmuls' if grouped else 'in a loop'}")
    print(f"parallel block, n_embd={args.n_embd} n_layer={args.n_layer} batch={args.batch_size}x{args.block_size} "
          f"rounds={args.rounds} x {args.steps} steps")
    print(f"  {'model':14s} {'params':>11s} {'active':>11s} {'step ms':>8s} {'x dense':>8s} {'decode tok/s':>13s} {'x dense':>8s}")
    for n in names:
        model = trainers[n][0]
        decode = ("" if args.no_decode else f"{32 / statistics.median(decode_s[n]):13.0f} "
                  f"{median_ratio(decode_s['dense'], decode_s[n]):8.2f}")
        print(f"  {n:14s} {model.num_params():>11,d} {model.num_active_params():>11,d} "
              f"{1000 * statistics.median(train_s[n]) / args.steps:8.1f} "
              f"{median_ratio(train_s[n], train_s['dense']):8.2f} {decode}")
    if "sparse" in names:
        print(f"  sparse (E=4, top-2) / dense training step: {median_ratio(train_s['sparse'], train_s['dense']):.2f}x "
              f"(targets: <= 1.8x on a CPU, <= 1.6x on a GPU)")


if __name__ == "__main__":
    main()
