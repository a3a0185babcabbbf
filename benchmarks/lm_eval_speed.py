"""lm-eval log-likelihood throughput: the archflow adapter (components/harness.py) vs lm-eval's own
`hf` model on the same weights, exported with `python -m tasks.export` and loaded by transformers.

    python -m benchmarks.lm_eval_speed [--rounds 30] [--calls 1] [--batch-sizes 1 16] [--threads 1]

The model: a serial preset at the default study's shape (d=128, 4 layers, 4 heads, SwiGLU, RMSNorm,
RoPE, block 128) with random weights (speed does not depend on them) and a 4096-token bpe tokenizer
trained on sympy's source (the default study's corpus). The requests: those lm-eval builds for the
local task tests/data/lm_eval/archflow_tiny_mc (10 items x 4 choices), scored in `--calls` separate
calls per timing (copies in one call would be deduplicated by both models' shared-input grouping), so
both models score exactly the same (context, continuation) pairs. Each round times both models
(order alternating); requests/s are medians over rounds, the speed ratio the median of per-round
ratios (with their range), per batch size. The largest difference between the two models'
log-likelihoods is printed as a check that they compute the same thing. Needs lm-eval's `hf`
model: `pip install -e '.[dev]' 'lm_eval[hf]'` (transformers, accelerate, peft).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sympy
import torch

from benchmarks.common import host_line, median_ratio
from components.artifacts import save_model_dir
from components.config import ModelConfig
from components.harness import ArchflowLM
from components.model import TransformerLM
from components.tokenizer import train_tokenizer
from tasks import export

TASKS = Path(__file__).resolve().parents[1] / "tests/data/lm_eval"


def build(tmp: Path) -> tuple[Path, Path, Path]:
    """(archflow model dir, its tokenizer.json, the exported Hugging Face dir)."""
    sources = sorted(Path(sympy.__file__).parent.rglob("*.py"))[:300]
    tok = train_tokenizer("bpe", [f.read_text(encoding="utf-8", errors="replace") for f in sources], 4096)
    tok.save(tmp / "tokenizer.json")
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=4, n_head=4, n_embd=128,
                                      ffn="swiglu", norm="rmsnorm", pos="rope"))
    save_model_dir(tmp / "serial", model, {"stage": "pretrain", "parents": []})
    export.main([str(tmp / "serial"), str(tmp / "hf"), "--tokenizer", str(tmp / "tokenizer.json")])
    return tmp / "serial", tmp / "tokenizer.json", tmp / "hf"


def requests() -> list:
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(TASKS), include_defaults=False).load(["archflow_tiny_mc"])["tasks"]["archflow_tiny_mc"]
    task.build_all_requests(rank=0, world_size=1)
    return task.instances


def timed(lm, reqs, calls: int = 1) -> tuple[float, list[float]]:
    """Seconds for `calls` separate loglikelihood calls over reqs, and the last call's scores."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - t0, [score for score, _ in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="short rounds: a busy machine's drift cancels in their ratios")
    p.add_argument("--calls", type=int, default=1, help="loglikelihood calls over the task's 40 requests per timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok_file, hf_dir = build(Path(tmp))
        reqs = requests()
        print(f"host: {host_line()}")
        print(f"{len(reqs)} loglikelihood requests (archflow_tiny_mc) per call, {args.calls} calls per timing, "
              f"{args.rounds} interleaved rounds\n")
        rows = []
        for bs in args.batch_sizes:
            ours = ArchflowLM(path=str(model_dir), tokenizer=str(tok_file), device="cpu", batch_size=bs)
            hf = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=bs)
            timed(ours, reqs[:bs]), timed(hf, reqs[:bs])                    # warm-up
            t_ours, t_hf = [], []
            for r in range(args.rounds):
                for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                    seconds, scores = timed(ours if name == "ours" else hf, reqs, args.calls)
                    (t_ours if name == "ours" else t_hf).append(seconds)
                    if name == "ours":
                        ours_scores = scores
                    else:
                        hf_scores = scores
            diff = max(abs(a - b) for a, b in zip(ours_scores, hf_scores))
            n = len(reqs) * args.calls
            ratios = [h / o for h, o in zip(t_hf, t_ours)]                   # > 1: archflow faster
            rows.append((bs, n / statistics.median(t_ours), n / statistics.median(t_hf),
                         median_ratio(t_hf, t_ours), min(ratios), max(ratios), diff))
        print("| batch | archflow req/s | hf req/s | archflow / hf speed (median of rounds) | rounds' range | "
              "max abs Δ log-likelihood |")
        print("|---:|---:|---:|---:|---:|---:|")
        for bs, ours_rps, hf_rps, ratio, lo, hi, diff in rows:
            print(f"| {bs} | {ours_rps:,.0f} | {hf_rps:,.0f} | {ratio:.2f} | {lo:.2f}-{hi:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
