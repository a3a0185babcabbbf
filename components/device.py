"""The torch device a study's `train.accelerator` means, and the name metrics record for a device.

Training hands `train.accelerator` to Lightning; evaluate resolves it here, so a model is measured
on the accelerator it trained on.

    python -c "from components.device import device_name, resolve_device; print(device_name(resolve_device('auto')))"
"""
from __future__ import annotations

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
