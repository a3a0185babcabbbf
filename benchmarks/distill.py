"""Distillation step time vs a plain pretrain step of the same student: the teacher's overhead.

    python -m benchmarks.distill [--n-embd 128] [--teacher-layers 4] [--student-layers 2] [--rounds 5] [--steps 10]

Same student, batches, optimizer and clipping; the distillation step adds the frozen teacher's
forward (no_grad), the chunked KD loss over the vocabulary (recomputed in backward) and, with
--hidden-weight, the hidden-state cosine term. Contenders run in interleaved rounds; the ratio is
the median of per-round ratios (distill seconds / plain seconds: 1.0 = no overhead). The
default shapes are the default study's serial teacher and its 2-layer student.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import TRAIN, batches, median_ratio, plain_trainer, timed_steps
from components.config import ModelConfig
from components.distill import LitDistill
from components.model import TransformerLM


def distill_trainer(student_cfg: ModelConfig, teacher: TransformerLM, hidden_weight: float, seed: int = 0):
    """A plain loop around LitDistill.training_step, with LitLM's optimizer, schedule and clipping."""
    torch.manual_seed(seed)
    lit = LitDistill(TransformerLM(student_cfg), teacher, TRAIN, hidden_weight=hidden_weight)
    lit.log = lit.log_dict = lambda *a, **k: None          # no Trainer to log to
    opt_cfg = lit.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]

    def step(x, y):
        loss = lit.training_step((x, y), 0)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lit.parameters(), TRAIN.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden-weight", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    shape = dict(vocab_size=args.vocab_size, block_size=128, n_embd=args.n_embd, n_head=max(1, args.n_embd // 32),
                 ffn="swiglu", norm="rmsnorm", pos="rope")
    student_cfg = ModelConfig(n_layer=args.student_layers, **shape)
    teacher = TransformerLM(ModelConfig(n_layer=args.teacher_layers, **shape))
    steps = {"plain": plain_trainer(student_cfg)[1], "distill": distill_trainer(student_cfg, teacher, args.hidden_weight)}
    data = batches(student_cfg, args.batch_size)
    for name in steps:
        timed_steps(steps[name], data, 0, 2)                    # warm-up
    seconds = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (["plain", "distill"] if r % 2 else ["distill", "plain"]):
            seconds[name].append(timed_steps(steps[name], data, 2 + r * args.steps, args.steps)[0])
    tokens = args.steps * args.batch_size * student_cfg.block_size
    print(f"teacher {args.teacher_layers}L / student {args.student_layers}L, n_embd={args.n_embd}, "
          f"vocab={args.vocab_size}, batch={args.batch_size}x128, hidden_weight={args.hidden_weight}, "
          f"threads={torch.get_num_threads()}")
    for name in steps:
        print(f"  {name:8s} median {tokens / statistics.median(seconds[name]):8.0f} tokens/s")
    print(f"  distill/plain step time (median of per-round ratios): {median_ratio(seconds['distill'], seconds['plain']):.3f}")


if __name__ == "__main__":
    main()
