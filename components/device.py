"""The torch device a study's `train.accelerator` means, the name metrics record for a device, and
what `train.precision: auto` resolves to on it.

Training hands `train.accelerator` to Lightning; evaluate resolves it here, so a model is measured
on the accelerator it trained on.

    python -c "from components.device import device_name, resolve_device; print(device_name(resolve_device('auto')))"
"""
from __future__ import annotations

import os

import torch

from components.errors import ParamsError


def resolve_device(accelerator: str) -> torch.device:
    """auto: cuda if available, else mps if available, else the CPU; gpu: cuda or mps; cpu, cuda, mps:
    that one, or a ParamsError when this machine has none."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    gpu = "cuda" if cuda else "mps" if mps else None
    found = {"auto": gpu or "cpu", "cpu": "cpu", "gpu": gpu, "cuda": "cuda" if cuda else None,
             "mps": "mps" if mps else None}
    if accelerator not in found:
        raise ParamsError(f"train.accelerator: '{accelerator}' is not one evaluate can run on: "
                          f"set one of {', '.join(found)}")
    if found[accelerator] is None:
        raise ParamsError(f"train.accelerator: '{accelerator}' is not available on this machine (torch finds "
                          f"no {'GPU' if accelerator == 'gpu' else accelerator.upper()}): run on a machine that "
                          f"has one, or set train.accelerator to auto or cpu")
    return torch.device(found[accelerator])


def device_name(device: torch.device) -> str:
    """"cpu", "mps" or "cuda:<the GPU's name>" (e.g. cuda:NVIDIA H200)."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


# Precision `auto` (train.precision): bf16-mixed where it pays, else 32-true. The crossover width is
# measured, not guessed: `python -m benchmarks.bf16` (benchmarks/README.md, "bf16-mixed vs fp32 by width").
BF16_MIN_WIDTH = 512            # n_embd from which bf16-mixed trained faster than fp32 on an AVX512-BF16/AMX CPU
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of native bf16 matrix math on x86


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has native bf16 matrix math: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX-BF16. Elsewhere (AVX2-only CPUs, MPS) bf16 matmuls are emulated or partial."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & set(CPU_BF16_FLAGS))
    return False


def resolve_precision(precision: str, accelerator: str, n_embd: int) -> tuple[str, str]:
    """(the precision Lightning gets, why): `auto` is bf16-mixed when the device train.accelerator
    names has native bf16 matrix math and the model is at least BF16_MIN_WIDTH wide, else 32-true;
    any other value is returned as it is."""
    if precision != "auto":
        return precision, "set in train.precision"
    device = resolve_device(accelerator)
    if not native_bf16(device):
        what = f"no bf16 matrix instructions ({' or '.join(CPU_BF16_FLAGS)})" if device.type == "cpu" else \
            "no native bf16 matrix math"
        return "32-true", f"{device.type}: {what}"
    if n_embd < BF16_MIN_WIDTH:
        return "32-true", f"n_embd {n_embd} < {BF16_MIN_WIDTH}, below which bf16-mixed measured no faster"
    return "bf16-mixed", f"{device.type} has native bf16 and n_embd {n_embd} >= {BF16_MIN_WIDTH}"


# Lightning's order (lightning.fabric.utilities.rank_zero._get_rank): a launcher's variable for the
# process's rank; none set means a single process, rank 0
RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank0() -> bool:
    """Whether this process is global rank 0, the one that writes outputs and talks to MLflow. DDP
    runs the stage once per rank; a rank's environment says which it is before the Trainer starts
    (the rank Lightning's rank_zero_only reads; here without importing Lightning)."""
    return int(next((os.environ[k] for k in RANK_ENV if k in os.environ), 0)) == 0
