"""nanoGPT's CPU recipe as a plain PyTorch loop vs archflow's pretrain path, on a char-level corpus.

    python -m benchmarks.nanogpt --steps 60          # quick check that it runs (< 1 minute)
    python -m benchmarks.nanogpt                     # 500 steps, seed 0
    python -m benchmarks.nanogpt --full              # 2000 steps (nanoGPT's), seeds 0 and 1
    python -m benchmarks.nanogpt --wide              # d=384, 6 layers, context 256, batch 8, 200 steps:
                                                     # archflow bf16-mixed + torch.compile vs nanoGPT-style fp32

nanoGPT (github.com/karpathy/nanoGPT, not a package) trains its char-level Shakespeare model on a
CPU with: 4 layers, 4 heads, d=128, context 64, batch 12, GELU MLP 4x, LayerNorm, learned
positions, no biases, dropout 0, AdamW (0.9, 0.99), weight decay 0.1 on matrices and embeddings,
lr 1e-3 with 100 warm-up steps and a cosine to 1e-4 at 2000 steps, gradient clipping at 1.0, random
windows of the train split. `nano` below is that recipe written here as a plain loop (its own
model class, its own lr schedule: warm-up lr*(it+1)/(warmup+1)). `archflow` is what the pretrain
stage runs: TransformerLM (preset serial with ffn gelu, norm layernorm, pos learned, bias false:
the same architecture) in LitLM through `make_trainer` (the stage's Trainer, deterministic, one
checkpoint at the last step, the curve's validation at the last step only) with the same TrainParams.

The corpus is the default study's (the sympy 1.14.0 sources archflow installs; no download) with
archflow's char tokenizer: the documents joined by <|endoftext|>, the first 90% of the tokens to
train on, the last 10% to validate on, as nanoGPT splits its text. Both contenders draw the same
batch at every step (StepBatches: random windows of the train split).

Interleaving: the plain loop runs inside the Lightning fit, in a callback every `steps / rounds`
steps, so both train in one piece (optimizer state and lr schedule continue) and alternate: archflow
segment, nano segment, archflow segment, ... The first segment of each (Trainer set-up, warm-up,
compilation) is not timed; tokens/s are medians over the rest, the ratio the median of per-round
ratios. Final validation loss: the same 256 evenly spread windows of the val split for both.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import host_line
from components.config import ModelConfig
from components.corpus import read_texts, select_files
from components.data import StepBatches, eval_offsets, load_tokens, window_batch
from components.lit import LitLM, LMDataModule, TrainingCurve, make_trainer
from components.model import lm_loss
from components.params import DataParams, TrainParams
from components.tokenizer import train_tokenizer

SHAPES = {"nano": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12},
          "wide": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 8}}
VAL_WINDOWS = 256


def char_corpus(out: Path) -> int:
    """Write the default corpus, char-tokenized, as a prepared directory (train.bin, val.bin, meta.json)
    that archflow's data module reads; returns the vocabulary size."""
    data = DataParams()
    root, files = select_files(data.source, data.include, data.exclude)
    texts = read_texts(root, files)
    tok = train_tokenizer("char", texts, 0)
    ids = np.concatenate([np.asarray(tok.encode(t) + [tok.eot_id], dtype=np.uint16) for t in texts])
    n_train = int(0.9 * len(ids))
    ids[:n_train].tofile(out / "train.bin")
    ids[n_train:].tofile(out / "val.bin")
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": n_train,
                                               "val_tokens": len(ids) - n_train, "domains": {}}))
    return tok.vocab_size


# ---------------------------------------------------------------------------------------------
# nanoGPT's recipe, written here as a plain loop


class NanoBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(NanoBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight                        # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:                                         # N(0, 0.02); residual outputs scaled down
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nano_lr(it: int, t: TrainParams) -> float:
    """nanoGPT's schedule: linear warm-up, cosine to min_lr at max_steps."""
    if it < t.warmup_steps:
        return t.lr * (it + 1) / (t.warmup_steps + 1)
    ratio = min(1.0, (it - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def nano_trainer(vocab: int, shape: dict, t: TrainParams, seed: int):
    torch.manual_seed(seed)
    model = NanoGPT(vocab, shape["block_size"], shape["n_layer"], shape["n_head"], shape["n_embd"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2))

    def step(it: int, x, y) -> float:
        for group in opt.param_groups:
            group["lr"] = nano_lr(it, t)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


# ---------------------------------------------------------------------------------------------
# the two, interleaved inside archflow's fit


class Interleave(L.Callback):
    """Every `segment` steps of archflow's fit: time the archflow segment just ended, then run and time
    the nano loop's next `segment` steps on the same batches. Listed before the curve, so the
    curve's validation and checkpoint (at the last step) are in neither's time."""

    def __init__(self, segment: int, nano_step, batches: StepBatches):
        self.segment, self.nano_step, self.batches = segment, nano_step, batches
        self.archflow, self.nano, self.nano_it, self._mark = [], [], 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._mark is None:
            self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.segment:
            return
        self.archflow.append(time.perf_counter() - self._mark)
        t0 = time.perf_counter()
        for _ in range(self.segment):
            self.nano_step(self.nano_it, *self.batches[self.nano_it])
            self.nano_it += 1
        self.nano.append(time.perf_counter() - t0)
        self._mark = time.perf_counter()


@torch.no_grad()
def val_loss(model: nn.Module, val: np.ndarray, block_size: int, batch_size: int = 32) -> float:
    was = model.training
    model.eval()
    offsets = eval_offsets(len(val), block_size, VAL_WINDOWS)
    losses = [lm_loss(model(x), y).item() for i in range(0, len(offsets), batch_size)
              for x, y in [window_batch(val, offsets[i:i + batch_size], block_size)]]
    model.train(was)
    return float(np.mean(losses))


def run(prepared: Path, vocab: int, shape: dict, steps: int, rounds: int, seed: int, precision: str,
        compile: bool) -> dict:
    """One seed: archflow's fit with the nano loop interleaved; tokens/s, ratio, final val losses."""
    t = TrainParams(max_steps=steps, batch_size=shape["batch_size"], lr=1e-3, min_lr=1e-4,
                    warmup_steps=min(100, steps // 10), weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                    eval_every=steps, eval_batches=1, ckpt_every=steps, accelerator="cpu", devices=1,
                    precision=precision, compile=compile)
    block, batch = shape["block_size"], shape["batch_size"]
    cfg = ModelConfig.from_preset("serial", vocab_size=vocab, block_size=block, n_layer=shape["n_layer"],
                                  n_head=shape["n_head"], n_embd=shape["n_embd"], ffn="gelu", norm="layernorm",
                                  pos="learned", bias=False, dropout=0.0)
    nano_model, nano_step = nano_trainer(vocab, shape, t, seed)
    L.seed_everything(seed, verbose=False)
    lit = LitLM(cfg, t)
    data = LMDataModule(prepared, block, batch, seed)
    val = load_tokens(prepared, "val")
    curve = TrainingCurve(val, block, batch, t.eval_batches, t.eval_every, steps)
    inter = Interleave(steps // rounds, nano_step, StepBatches(load_tokens(prepared, "train"), block, batch, seed))
    with tempfile.TemporaryDirectory() as ckpt:
        trainer = make_trainer(t, Path(ckpt), [inter, curve], False, cfg.n_embd)
        trainer.fit(lit, datamodule=data)
    a, n = inter.archflow[1:], inter.nano[1:]                  # the first segment of each: warm-up
    tokens = inter.segment * batch * block
    return {"seed": seed, "params_archflow": lit.model.num_params(), "params_nano": sum(p.numel() for p in nano_model.parameters()),
            "archflow_tok_s": tokens / statistics.median(a), "nano_tok_s": tokens / statistics.median(n),
            "ratio": statistics.median(x / y for x, y in zip(n, a)), "ratio_range": (min(x / y for x, y in zip(n, a)),
                                                                                   max(x / y for x, y in zip(n, a))),
            "val_archflow": val_loss(lit.model, val, block), "val_nano": val_loss(nano_model, val, block),
            "precision": str(trainer.precision), "compile_s": curve.timing()["compile_s"], "rounds": len(a)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps of each (default 500; --full 2000; --wide 200)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved segments (default: steps/10, at most 20; the first is warm-up)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0; --full: 0 1")
    p.add_argument("--full", action="store_true", help="nanoGPT's 2000 steps, two seeds")
    p.add_argument("--wide", action="store_true", help="d=384, 6 layers, 6 heads, context 256, batch 8; archflow with "
                                                       "--precision and --compile (default bf16-mixed, compiled)")
    p.add_argument("--precision", default=None, help="archflow's train.precision (default 32-true; --wide: bf16-mixed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="archflow's train.compile (default off; --wide: on)")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    shape = SHAPES["wide" if args.wide else "nano"]
    steps = args.steps or (200 if args.wide else 2000 if args.full else 500)
    rounds = args.rounds or max(2, min(20, steps // 10))
    if steps % rounds or steps // rounds < 5:
        p.error(f"--steps {steps} must be --rounds {rounds} segments of 5 steps or more each: change either")
    seeds = args.seeds or ([0, 1] if args.full else [0])
    precision = args.precision or ("bf16-mixed" if args.wide else "32-true")
    compile = args.compile if args.compile is not None else args.wide
    print(host_line())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        vocab = char_corpus(Path(tmp))
        print(f"char corpus: vocab {vocab}, {len(load_tokens(tmp, 'train')):,} train / {len(load_tokens(tmp, 'val')):,} "
              f"val tokens ({time.perf_counter() - t0:.1f} s)")
        print(f"shape {shape}; {steps} steps, {rounds} segments of {steps // rounds} (the first untimed); "
              f"archflow precision {precision}, compile {compile}; nano fp32 eager", flush=True)
        results = [run(Path(tmp), vocab, shape, steps, rounds, seed, precision, compile) for seed in seeds]
    for r in results:
        print(f"seed {r['seed']}: archflow {r['archflow_tok_s']:,.0f} tok/s ({r['precision']}, compile_s "
              f"{r['compile_s']}), nano {r['nano_tok_s']:,.0f} tok/s, archflow/nano {r['ratio']:.3f} (median of "
              f"{r['rounds']} rounds; range {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}); val loss after "
              f"{steps} steps: archflow {r['val_archflow']:.4f}, nano {r['val_nano']:.4f} "
              f"(diff {r['val_archflow'] - r['val_nano']:+.4f}); params {r['params_archflow']:,} / {r['params_nano']:,}")
    if len(results) > 1:
        va, vn = [r["val_archflow"] for r in results], [r["val_nano"] for r in results]
        print(f"over {len(results)} seeds: mean val loss archflow {statistics.mean(va):.4f} (SD {statistics.stdev(va):.4f}), "
              f"nano {statistics.mean(vn):.4f} (SD {statistics.stdev(vn):.4f}); mean diff "
              f"{statistics.mean(va) - statistics.mean(vn):+.4f}; median ratio {statistics.median(r['ratio'] for r in results):.3f}")


if __name__ == "__main__":
    main()
