"""Training step time of MoE and mixture-of-attention models vs their dense parent, and decode
tokens/s of each kind of upcycled model.

    python -m benchmarks.moe [--n-embd 128] [--rounds 5] [--steps 10]
    python -m benchmarks.moe --quick        # tiny shapes, one short round: checks that it runs
    python -m benchmarks.moe --device cuda  # on a GPU

The default study's shapes (parallel block, 4 layers, d=128, SwiGLU, vocab 4096, batch 16 x 128).
Contenders, all with the parent's dense weights' shapes:
  dense         the parallel parent (what `continue` trains)
  sparse        E=4 experts, top-2, every layer (what `sparse` makes; target: <= 1.8x dense's step)
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

from benchmarks.common import TRAIN, batches, decode_seconds, median_ratio, shape_parser, timed_steps
from components.config import ModelConfig
from components.lit import LitLM, lm_loss
from components.model import moe_losses

CONTENDERS = {
    "dense": {},
    "sparse": dict(n_expert=4, top_k=2),
    "btx": dict(n_expert=3, top_k=2),
    "moa": dict(n_attn_expert=3),
    "bam": dict(n_expert=3, top_k=2, n_attn_expert=3),
    "bam-kv-shared": dict(n_expert=3, top_k=2, n_attn_expert=3, moa="kv-shared"),
}


def moe_trainer(cfg: ModelConfig, device: str, seed: int = 0):
    """benchmarks.common.plain_trainer's loop with the MoE aux losses in the loss, as LitLM adds them."""
    torch.manual_seed(seed)
    lit = LitLM(cfg, TRAIN).to(device)
    opt_cfg = lit.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]

    def step(x, y):
        x, y = x.to(device), y.to(device)
        loss = lm_loss(lit.model(x), y)
        if (aux := moe_losses(lit.model)) is not None:
            loss = loss + cfg.aux_loss_coef * aux["aux_loss"] + cfg.z_loss_coef * aux["z_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lit.model.parameters(), TRAIN.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()                                 # waits for the device, as logging would
    return lit.model, step



def main():
    p = shape_parser(__doc__, rounds=5, steps=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and one short round (a smoke check)")
    args = p.parse_args()
    if args.quick:
        args.n_embd, args.n_layer, args.batch_size, args.rounds, args.steps = 32, 2, 4, 1, 2
    base = dict(vocab_size=4096 if not args.quick else 256, block_size=128, n_layer=args.n_layer,
                n_embd=args.n_embd, n_head=max(args.n_embd // 32, 1), block="parallel", ffn="swiglu",
                norm="rmsnorm", pos="rope")
    cfgs = {name: ModelConfig(**base, **kw) for name, kw in CONTENDERS.items()}
    names = list(cfgs)
    data = batches(cfgs["dense"], args.batch_size)
    trainers = {n: moe_trainer(cfgs[n], args.device) for n in names}
    for n in names:
        timed_steps(trainers[n][1], data, 0, 2)                 # warm-up
    train_s, decode_s = {n: [] for n in names}, {n: [] for n in names}
    prompt = torch.randint(0, base["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0)).to(args.device)
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:   # rotate the order each round
            train_s[n].append(timed_steps(trainers[n][1], data, 2 + r * args.steps, args.steps)[0])
            model = trainers[n][0].eval()
            decode_seconds(model, prompt, 4)                    # warm-up
            decode_s[n].append(decode_seconds(model, prompt, 32))
            model.train()
    print(f"parallel block on {args.device}, n_embd={args.n_embd} n_layer={args.n_layer} batch={args.batch_size}x128 "
          f"threads={torch.get_num_threads()} rounds={args.rounds} x {args.steps} steps")
    print(f"  {'model':14s} {'params':>10s} {'active':>10s} {'step ms':>8s} {'x dense':>8s} {'decode tok/s':>13s} {'x dense':>8s}")
    for n in names:
        model = trainers[n][0]
        print(f"  {n:14s} {model.num_params():>10,d} {model.num_active_params():>10,d} "
              f"{1000 * statistics.median(train_s[n]) / args.steps:8.1f} "
              f"{median_ratio(train_s[n], train_s['dense']):8.2f} {32 / statistics.median(decode_s[n]):13.0f} "
              f"{median_ratio(decode_s['dense'], decode_s[n]):8.2f}")
    print(f"  sparse (E=4, top-2) / dense training step: {median_ratio(train_s['sparse'], train_s['dense']):.2f}x "
          f"(target <= 1.8x); soft MoA / plain attention: {median_ratio(train_s['moa'], train_s['dense']):.2f}x")


if __name__ == "__main__":
    main()
