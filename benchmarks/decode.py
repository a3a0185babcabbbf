"""Decode speed of every preset, and MQA/GQA: batch-1 latency, batched throughput, the cache's size.

    python -m benchmarks.decode [--n-embd 128] [--n-layer 4] [--rounds 5] [--prompt-tokens 64]
                                [--decode-tokens 32] [--batch 16] [--presets serial mqa ...]
    python -m benchmarks.decode --against DIR [--rounds 7] [--step-batch 1] [--step-kv-heads 4]   # this code vs DIR's
    python -m benchmarks.decode --compiled [--device cuda] [--presets serial hybrid]   # eager vs compiled steps

Models: the default study's shape (vocab 4096, block 128, swiglu, rmsnorm, rope) at matched parameter
counts as in benchmarks/presets.py, plus `mqa` and `gqa` (serial with 1 and 2 of its 4 heads' k/v). Per
model, in interleaved rounds (order rotating, after a warm-up): batch-1 cached decode (`--decode-tokens`
greedy steps after a `--prompt-tokens` prefill, the prefill not timed: evaluate's decode_tokens_per_s),
the same without a cache (each token recomputes the whole context: the naive reference the cache saves),
and `--batch` sequences decoding at once from `--prompt-tokens` cached tokens each (evaluate's
decode_batch_tokens_per_s), with kv_cache_bytes_per_token and state_bytes_per_sequence
(components/flops.py cache_bytes). Ratios to serial are medians of per-round ratios.

`--against DIR`: DIR holds other code of this project (e.g. `git archive main | tar -x -C /tmp/main`);
the cached decode step of the default serial model (64 tokens of context; `--step-batch` sequences,
`--step-kv-heads` k/v heads of its 4, 1 for MQA) runs alternately in a fresh process of each code base (PYTHONPATH=DIR, then this checkout), `--rounds` times; each process
prints its median wall and CPU (process) time per step over 7 blocks of 100 steps. CPU time is the steadier
of the two on a shared machine when one thread runs (OMP_NUM_THREADS=1); with more threads it adds theirs.

`--compiled`: batch-1 (and `--step-batch`) decode of each of `--presets` (default serial) three ways, in
interleaved rounds after a warm-up that compiles: the eager forward with the cache (what generate runs),
the eager fixed-shape step (TransformerLM.step: every attention reads its whole cache under a mask) and
that step compiled (TransformerLM.compiled_step: torch.compile; on a GPU "reduce-overhead", one CUDA graph
per step). The compile seconds are printed apart; float32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from benchmarks.common import decode_seconds, device_line, host_line, median_ratio
from benchmarks.presets import matched, n_params
from components.config import PRESETS, ModelConfig
from components.flops import cache_bytes
from components.model import TransformerLM

EXTRA = {"mqa": ("serial", {"n_kv_head": 1}), "gqa": ("serial", {"n_kv_head": 2})}   # name -> (preset, overrides)

STEP = """
import statistics, sys, time, torch
from components.config import ModelConfig
from components.model import TransformerLM
torch.manual_seed(0)
B, n_kv_head = {batch}, {kv_heads}
cfg = ModelConfig.from_preset("serial", vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128,
                              n_kv_head=n_kv_head, ffn="swiglu", norm="rmsnorm", pos="rope")
model = TransformerLM(cfg).eval()
with torch.inference_mode():
    cache = model.new_cache(B, 128)
    token = model(torch.randint(0, 4096, (B, 64)), cache)[:, -1:].argmax(-1)
    def block(clock, n=100):
        t0 = clock()
        for _ in range(n):
            cache.pos = 64                                 # the same step again: 64 tokens of context
            model(token, cache)
        return (clock() - t0) / n
    block(time.perf_counter, 30)
    wall = statistics.median(block(time.perf_counter) for _ in range(7))
    cpu = statistics.median(block(time.process_time) for _ in range(7))
print(wall, cpu)
"""


def config(name: str, base: dict, target: int) -> ModelConfig:
    if name in EXTRA:
        preset, own = EXTRA[name]
        return ModelConfig.from_preset(preset, **base, **own)
    return matched(name, base, target)


@torch.inference_mode()
def recompute_seconds(model, prompt: torch.Tensor, n: int) -> float:
    """Seconds for n greedy tokens without a cache: each step runs the full forward over all tokens so far."""
    idx = prompt
    t0 = time.perf_counter()
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[:, -1:].argmax(-1)], dim=1)
    return time.perf_counter() - t0


@torch.no_grad()
def step_seconds(model, prompt: torch.Tensor, n: int, how: str = "eager") -> float:
    """Seconds for n greedy cached steps of prompt.size(0) sequences after the prompt's prefill (not timed),
    `how`: "eager" (the forward with the cache), "compiled" (model.compiled_step) or "fixed" (model.step,
    the fixed-shape step compiled_step compiles, run eagerly)."""
    cache, advance = model.decoder(prompt.size(0), compile=how == "compiled")
    logits = model(prompt, cache)
    positions = torch.full((1,), cache.pos, device=prompt.device)     # "fixed": where the next token goes
    sync(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        token = logits[:, -1:].argmax(-1)
        if how == "fixed":
            logits = model.step(token, cache, positions)
            positions += 1
        else:
            logits = advance(token)
    sync(prompt)
    return time.perf_counter() - t0


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def compare_compiled(names: list[str], base: dict, target: int, args) -> None:
    """Eager vs fixed-shape vs compiled decode steps (see the docstring)."""
    ways = ("eager", "fixed", "compiled")
    models, prompts, compile_s = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    for n in names:
        torch.manual_seed(0)
        models[n] = TransformerLM(config(n, base, target)).to(args.device).eval()
        prompts[n] = torch.randint(0, base["vocab_size"], (args.step_batch, args.prompt_tokens), generator=g).to(args.device)
        t0 = time.perf_counter()
        for _ in range(3):                                   # CUDA graphs: warm-up run, recording, replay
            step_seconds(models[n], prompts[n], 4, "compiled")
        compile_s[n] = time.perf_counter() - t0
        for how in ("eager", "fixed"):
            step_seconds(models[n], prompts[n], 4, how)
        same = torch.equal(models[n].generate(prompts[n], 16, temperature=0, compile=True),
                           models[n].generate(prompts[n], 16, temperature=0))
        print(f"{n}: compiled greedy tokens == eager: {same}", flush=True)
    t = {n: {w: [] for w in ways} for n in names}
    for r in range(args.rounds):
        for n in names:
            for w in ways[r % 3:] + ways[:r % 3]:            # rotate the order each round
                t[n][w].append(step_seconds(models[n], prompts[n], args.decode_tokens, w))
    print(device_line(args.device))
    print(f"n_embd={args.n_embd} n_layer={args.n_layer} batch={args.step_batch} prompt={args.prompt_tokens} "
          f"decode={args.decode_tokens} rounds={args.rounds}; float32; ms per step (medians), speed-ups are medians "
          f"of per-round ratios")
    print("| model | eager ms | fixed-shape ms | compiled ms | compiled x eager | compile s |\n|---|---:|---:|---:|---:|---:|")
    for n in names:
        ms = {w: statistics.median(t[n][w]) / args.decode_tokens * 1e3 for w in ways}
        print(f"| {n} | {ms['eager']:.3f} | {ms['fixed']:.3f} | {ms['compiled']:.3f} "
              f"| {median_ratio(t[n]['eager'], t[n]['compiled']):.2f} | {compile_s[n]:.1f} |")
    if args.device != "cpu":                                 # 0: every compiled step ran as a CUDA graph
        print(f"CUDA graphs skipped: {counters['inductor']['cudagraph_skips']}")


def against(other: Path, rounds: int, batch: int = 1, kv_heads: int = 4) -> None:
    """The decode step of this checkout vs the code in `other`, alternating fresh processes."""
    here = Path(__file__).resolve().parent.parent
    times = {"other": [], "this": []}
    for r in range(rounds):
        for who in (["other", "this"] if r % 2 == 0 else ["this", "other"]):
            root = other if who == "other" else here
            out = subprocess.run([sys.executable, "-c", STEP.format(batch=batch, kv_heads=kv_heads)], cwd=root, capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(root)}).stdout.split()
            times[who].append(tuple(map(float, out)))
            print(f"round {r + 1} {who}: {times[who][-1][0] * 1e3:.3f} ms wall, {times[who][-1][1] * 1e3:.3f} ms CPU",
                  flush=True)
    print(host_line())
    print(f"serial, batch {batch}, {kv_heads} k/v heads of 4, 64 tokens of context")
    print("| code | ms/step wall | ms/step CPU |\n|---|---:|---:|")
    for who, label in (("other", str(other)), ("this", "this checkout")):
        print(f"| {label} | {statistics.median(t[0] for t in times[who]) * 1e3:.3f} "
              f"| {statistics.median(t[1] for t in times[who]) * 1e3:.3f} |")
    for i, kind in enumerate(("wall", "CPU")):
        print(f"{kind}: other / this = {median_ratio([t[i] for t in times['other']], [t[i] for t in times['this']]):.3f} "
              f"(median of per-round ratios)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    names = list(PRESETS) + list(EXTRA)
    p.add_argument("--presets", nargs="+", default=names, choices=names)
    p.add_argument("--against", type=Path, help="a directory with other code of this project: compare the "
                                                "decode step of the two (see the docstring)")
    p.add_argument("--compiled", action="store_true", help="eager vs fixed-shape vs compiled decode steps of "
                                                           "--presets (default serial; see the docstring)")
    p.add_argument("--device", default="cpu", help="--compiled: cpu or cuda")
    p.add_argument("--step-batch", type=int, default=1, help="--against, --compiled: sequences decoded at once")
    p.add_argument("--step-kv-heads", type=int, default=4, choices=[1, 2, 4], help="--against: k/v heads of 4")
    args = p.parse_args()
    if args.against is not None:
        return against(args.against.resolve(), args.rounds, args.step_batch, args.step_kv_heads)
    if args.compiled:
        names = args.presets if args.presets != p.get_default("presets") else ["serial"]
    else:
        names = ["serial"] + [n for n in args.presets if n != "serial"]
    base = dict(vocab_size=4096, block_size=128, n_layer=args.n_layer, n_embd=args.n_embd,
                n_head=args.n_embd // 32, ffn="swiglu", norm="rmsnorm", pos="rope")
    if args.prompt_tokens + args.decode_tokens > base["block_size"]:
        raise SystemExit(f"--prompt-tokens + --decode-tokens = {args.prompt_tokens + args.decode_tokens} exceeds "
                         f"the block size {base['block_size']}: lower them")
    target = n_params(ModelConfig(**base))
    if args.compiled:
        return compare_compiled(names, base, target, args)
    models = {}
    for n in names:
        torch.manual_seed(0)
        models[n] = TransformerLM(config(n, base, target)).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base["vocab_size"], (1, args.prompt_tokens), generator=g)
    context = torch.randint(0, base["vocab_size"], (args.batch, args.prompt_tokens), generator=g)
    runs = {"one": lambda m: decode_seconds(m, prompt, args.decode_tokens),
            "nocache": lambda m: recompute_seconds(m, prompt, args.decode_tokens),
            "batch": lambda m: step_seconds(m, context, args.decode_tokens)}
    for n in names:                                          # warm-up
        for run in runs.values():
            run(models[n])
    t = {n: {k: [] for k in runs} for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:                      # rotate the order each round
            for kind, run in runs.items():
                t[n][kind].append(run(models[n]))
    print(host_line())
    print(f"n_embd={args.n_embd} n_layer={args.n_layer} prompt={args.prompt_tokens} decode={args.decode_tokens} "
          f"batch={args.batch} rounds={args.rounds}; float32")
    print("| model | params | KV bytes/token | state bytes/seq | batch-1 ms/token | batch-1 tok/s | x serial "
          "| no-cache tok/s | cache speed-up | batch tok/s | x serial |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    n_tok, s = args.decode_tokens, t["serial"]
    for n in names:
        m, c = models[n], cache_bytes(models[n].cfg)
        one, batch = statistics.median(t[n]["one"]), statistics.median(t[n]["batch"])
        print(f"| {n} | {m.num_params():,d} | {c['kv_cache_bytes_per_token']:,d} | {c['state_bytes_per_sequence']:,d} "
              f"| {one / n_tok * 1e3:.2f} | {n_tok / one:,.0f} | {median_ratio(s['one'], t[n]['one']):.2f} "
              f"| {n_tok / statistics.median(t[n]['nocache']):,.0f} | {median_ratio(t[n]['nocache'], t[n]['one']):.2f} "
              f"| {args.batch * n_tok / batch:,.0f} | {median_ratio(s['batch'], t[n]['batch']):.2f} |")


if __name__ == "__main__":
    main()
