"""Shared pieces of the benchmarks: synthetic batches, a plain training loop, interleaved timing.

The machine's speed drifts (shared cores, power states), so contenders run in interleaved
rounds and are compared by the median of per-round ratios, never by separate averages.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from components.config import ModelConfig
from components.data import StepBatches
from components.device import cpu_flags
from components.lit import LitLM
from components.model import lm_loss, moe_losses
from components.params import TrainParams

TRAIN = TrainParams(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=10_000, weight_decay=0.1,
                    beta1=0.9, beta2=0.95, grad_clip=1.0)


def batches(cfg: ModelConfig, batch_size: int, seed: int = 0) -> StepBatches:
    """Batches by step over random tokens: speed does not depend on the text."""
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, 2_000_000, dtype=np.int64)
    return StepBatches(tokens, cfg.block_size, batch_size, seed)


def plain_trainer(cfg: ModelConfig, precision: str = "32-true", seed: int = 0, device: str = "cpu",
                  compile: bool | str = False):
    """A plain PyTorch loop with the same model, optimizer, schedule, clipping and MoE aux losses as
    LitLM (and, with `compile`, the same torch.compile'd view of the model for the step; a string is
    torch.compile's mode: "reduce-overhead" replays forward and backward as CUDA graphs on a GPU)."""
    torch.manual_seed(seed)
    lit = LitLM(cfg, TRAIN).to(device)
    opt_cfg = lit.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    forward = torch.compile(lit.model, mode=compile if isinstance(compile, str) else None) if compile else lit.model

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = lm_loss(forward(x), y)
            if (aux := moe_losses(lit.model)) is not None:
                loss = loss + cfg.aux_loss_coef * aux["aux_loss"] + cfg.z_loss_coef * aux["z_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lit.model.parameters(), TRAIN.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()                                 # waits for the device, as logging would
    return lit.model, step


def compiled(compile: bool | str) -> str:
    """How a benchmark's header names --compile: "", ", compiled" or ", compiled (MODE)"."""
    return "" if not compile else ", compiled" if compile is True else f", compiled ({compile})"


def timed_steps(step, data: StepBatches, start: int, n: int) -> tuple[float, float]:
    """(seconds, last loss) of n training steps from step `start`."""
    t0 = time.perf_counter()
    for s in range(start, start + n):
        loss = step(*data[s])
    return time.perf_counter() - t0, loss


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def shape_parser(doc: str, rounds: int, steps: int) -> argparse.ArgumentParser:
    """The options of the training-speed benchmarks: model width and depth, batch, interleaved rounds,
    and where and how to train (device, precision, torch.compile)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="tokens a sequence")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile the model (compilation in the warm-up); MODE: torch.compile's mode, "
                        "e.g. reduce-overhead (CUDA graphs on a GPU)")
    return p


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, n: int) -> float:
    """Seconds for n greedy one-token steps after the prompt's prefill (the prefill not timed)."""
    cache = model.new_cache(1, prompt.size(1) + n)
    logits = model(prompt, cache)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model(logits[:, -1:].argmax(-1), cache)
    if logits.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def host_line() -> str:
    """One line naming the host a measurement ran on: CPU model, the cores this process may use,
    its SIMD flags that matter to torch (AVX2 / AVX-512 / bf16 / AMX), torch's version and threads,
    and the 1-minute load average (a busy machine measures slower)."""
    model, flags = "unknown CPU", cpu_flags()
    try:
        model = next(line.partition(":")[2].strip() for line in open("/proc/cpuinfo")
                     if line.partition(":")[0].strip() == "model name")
    except (OSError, StopIteration):                       # not Linux: the model is unknown
        pass
    simd = [f for f in SIMD_FLAGS if f in flags] or ["none of " + "/".join(SIMD_FLAGS)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    return (f"{model}, {cores} cores, flags {' '.join(simd)}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average (1 min) {load}")


def device_line(device: str) -> str:
    """host_line for the CPU; the GPU's name, CUDA and torch versions for cuda."""
    if torch.device(device).type != "cuda":
        return host_line()
    return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; torch {torch.__version__}"
