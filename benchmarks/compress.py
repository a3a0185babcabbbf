"""Compression against its fp32 source: size, batch-1 prefill/decode tokens/s and validation loss of
int8 (both compute paths, eager and torch.compile), pruned (30%, 50%), attention-dropped and FFN-fused
models, the last three before and after a short recovery by distillation from the source.

    python -m benchmarks.compress                  # source models/serial, data data/prepared (default study)
    python -m benchmarks.compress --quick          # a random 2-layer model on random tokens: checks it runs

Speed: each contender's prefill of --prompt-tokens and --decode-tokens cached steps, in interleaved
rounds; ratios are medians of per-round ratios to fp32 eager. Size: model.safetensors bytes as
save_model_dir writes them. Loss: mean next-token loss over --val-windows fixed validation windows
(with --quick, random tokens: the losses mean nothing, only that the code runs).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components import quant
from components.artifacts import load_model_dir, save_model_dir
from components.compress import (drop_attention, fuse_ffns, importance, keep_by_score, prune, quantize, search_drops,
                                  search_runs)
from components.config import ModelConfig
from components.data import StepBatches, eval_offsets, load_tokens, window_batch
from components.distill import kd_loss
from components.model import TransformerLM, lm_loss


def source_and_tokens(args):
    """(model, train tokens, val tokens): the trained model and its data, or a random stand-in."""
    if args.quick or not Path(args.model, "model.safetensors").exists():
        if not args.quick:
            raise SystemExit(f"{args.model} has no model: run the default study first, or pass --quick")
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, ffn="swiglu",
                          norm="rmsnorm", pos="rope")
        rng = np.random.default_rng(0)
        return TransformerLM(cfg).eval(), rng.integers(0, 512, 200_000), rng.integers(0, 512, 20_000)
    model, _ = load_model_dir(args.model)
    return model, load_tokens(args.data, "train"), load_tokens(args.data, "val")


@torch.no_grad()
def val_loss(model, val, n_windows: int) -> float:
    T = model.cfg.block_size
    offsets = eval_offsets(len(val), T, n_windows)
    return statistics.mean(lm_loss(model(x), y).item() for x, y in
                           (window_batch(val, offsets[i:i + 8], T) for i in range(0, n_windows, 8)))


def recover(student, teacher, batches: StepBatches, steps: int, lr: float) -> TransformerLM:
    """`steps` AdamW steps of KD from the teacher (alpha 0.5, T 2), as compress@'s recover: distill."""
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    for s in range(steps):
        x, y = batches[s]
        with torch.no_grad():
            t_logits = teacher(x)
        logits = student(x)
        loss = 0.5 * lm_loss(logits, y) + 0.5 * kd_loss(logits, t_logits, 2.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return student.eval()


def size_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(Path(d) / "m", model, {})
        return (Path(d) / "m" / "model.safetensors").stat().st_size


@torch.inference_mode()
def speed_once(model, forward, prompt: torch.Tensor, n_decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one batch-1 generation with the KV cache."""
    cache = model.new_cache(1, prompt.size(1) + n_decode)
    t0 = time.perf_counter()
    logits = forward(prompt, cache)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits = forward(logits[:, -1:].argmax(-1), cache)
    return t1 - t0, time.perf_counter() - t1


class Contender:
    """A model and how to run it: eager or compiled, and which int8 path (None: float)."""

    def __init__(self, name, model, path=None, compiled=False):
        self.name, self.model, self.path = name, model, path
        self.forward = torch.compile(model, dynamic=True) if compiled else model

    def run(self, prompt, n_decode):
        if self.path:
            quant.set_int8_path(self.path)
        return speed_once(self.model, self.forward, prompt, n_decode)


def measure(contenders, prompt, n_decode, rounds) -> dict:
    """name -> (prefill seconds per round, decode seconds per round), interleaved, after one warm-up each."""
    out = {}
    for c in list(contenders):
        try:
            c.run(prompt, n_decode)                         # warm-up (and compilation)
            out[c.name] = ([], [])
        except Exception as e:                              # torch.compile needs a C++ toolchain: say so, go on
            print(f"  {c.name}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            contenders.remove(c)
    for r in range(rounds):
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            p, d = c.run(prompt, n_decode)
            out[c.name][0].append(p), out[c.name][1].append(d)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/serial")
    p.add_argument("--data", default="data/prepared")
    p.add_argument("--quick", action="store_true", help="random 2-layer model, few rounds: checks the script runs")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--recover-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-loss-increase", type=float, default=0.2, help="FFN Fusion search bound (nats)")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.recover_steps, args.val_windows, args.prompt_tokens, args.decode_tokens = 2, 2, 8, 16, 8
    src, train_tokens, val = source_and_tokens(args)
    T = src.cfg.block_size
    batches = StepBatches(train_tokens, T, args.batch_size, seed=1)
    calib = [StepBatches(train_tokens, T, args.batch_size, seed=2)[s] for s in range(4)]
    base_loss = val_loss(src, val, args.val_windows)

    models, rows = {"fp32": src}, {}
    models["int8"] = quantize(src, embeddings=True)
    models["int8-linears"] = quantize(src, embeddings=False)
    for fraction in (0.3, 0.5):
        pruned = prune(src, *keep_by_score(importance(src, "taylor", calib), fraction))
        rows[f"prune-{fraction:.0%}"] = {"loss_before": val_loss(pruned, val, args.val_windows)}
        models[f"prune-{fraction:.0%}"] = recover(pruned, src, batches, args.recover_steps, args.lr)
    layers, _ = search_drops(src, calib, args.max_loss_increase)     # attention removal, then fusion of the
    dropped = drop_attention(src, layers)                               # FFN-only runs it leaves (the paper's order)
    runs, _ = search_runs(dropped, calib, args.max_loss_increase)
    fused = fuse_ffns(dropped, runs)
    rows["attention_drop"] = {"loss_before": val_loss(dropped, val, args.val_windows), "layers": layers}
    rows["ffn_fusion"] = {"loss_before": val_loss(fused, val, args.val_windows), "runs": runs,
                          "depth_removed": src.cfg.n_layer - fused.cfg.n_layer}
    models["attention_drop"] = recover(dropped, src, batches, args.recover_steps, args.lr)
    models["ffn_fusion"] = recover(fused, src, batches, args.recover_steps, args.lr)

    contenders = [Contender("fp32", src), Contender("int8 int8_mm", models["int8"], "int8_mm"),
                  Contender("int8 dequant", models["int8"], "dequant"),
                  Contender("int8-linears dequant", models["int8-linears"], "dequant")]
    contenders += [Contender(n, models[n]) for n in models if n.startswith(("prune", "attention", "ffn"))]
    if not args.no_compile:
        contenders += [Contender("fp32 compiled", src, compiled=True),
                       Contender("int8 int8_mm compiled", models["int8"], "int8_mm", compiled=True),
                       Contender("int8 dequant compiled", models["int8"], "dequant", compiled=True)]
    prompt = torch.from_numpy(np.asarray(val[:args.prompt_tokens], dtype=np.int64))[None]
    seconds = measure(contenders, prompt, args.decode_tokens, args.rounds)
    report(args, src, models, rows, seconds, base_loss, val)


def report(args, src, models, rows, seconds, base_loss, val):
    fp32_size, (fp32_pre, fp32_dec) = size_bytes(src), seconds["fp32"]
    print(f"source {args.model if not args.quick else '(random, --quick)'}: {src.num_params():,} params, "
          f"{fp32_size:,} bytes, val loss {base_loss:.4f}; threads={torch.get_num_threads()}, "
          f"rounds={args.rounds}, prompt {args.prompt_tokens}, decode {args.decode_tokens}, "
          f"recovery {args.recover_steps} KD steps")
    print(f"attention_drop layers {rows['attention_drop']['layers']}")
    if "ffn_fusion" in rows:
        print(f"ffn_fusion (of attention_drop) runs {rows['ffn_fusion']['runs']}: sequential depth -{rows['ffn_fusion']['depth_removed']} "
              f"of {src.cfg.n_layer} layers")
    print("| model | params | size x fp32 | prefill tok/s | prefill x fp32 | decode tok/s | decode x fp32 "
          "| Δloss before recovery | Δloss after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (pre, dec) in seconds.items():
        model = models[name.split()[0]]
        before = rows.get(name, {}).get("loss_before")
        after = val_loss(model, val, args.val_windows) - base_loss
        print(f"| {name} | {model.num_params():,} | {size_bytes(model) / fp32_size:.3f} "
              f"| {args.prompt_tokens / statistics.median(pre):,.0f} | {statistics.median(a / b for a, b in zip(fp32_pre, pre)):.2f} "
              f"| {args.decode_tokens / statistics.median(dec):,.0f} | {statistics.median(a / b for a, b in zip(fp32_dec, dec)):.2f} "
              f"| {'' if before is None else f'{before - base_loss:+.4f}'} | {after:+.4f} |")


if __name__ == "__main__":
    main()
