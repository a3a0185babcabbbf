"""train.accelerator -> the torch device evaluate runs on, with torch's view of the machine faked.

    .venv/bin/python -m pytest tests/components/test_device.py -q
"""
import pytest
import torch

from components.device import device_name, resolve_device
from components.errors import ParamsError


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda, mps): what torch reports as available from then on."""
    def fake(cuda: bool, mps: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return fake


@pytest.mark.parametrize("cuda,mps,auto,gpu", [
    (True, True, "cuda", "cuda"),
    (False, True, "mps", "mps"),
    (False, False, "cpu", None),
])
def test_auto_and_gpu_take_cuda_then_mps(machine, cuda, mps, auto, gpu):
    machine(cuda, mps)
    assert resolve_device("auto") == torch.device(auto) and resolve_device("cpu") == torch.device("cpu")
    if gpu:
        assert resolve_device("gpu") == torch.device(gpu)


@pytest.mark.parametrize("accelerator,words", [
    ("cuda", "train.accelerator: 'cuda' is not available on this machine (torch finds no CUDA)"),
    ("gpu", "'gpu' is not available on this machine (torch finds no GPU)"),
    ("mps", "'mps' is not available"),
    ("tpu", "train.accelerator: 'tpu' is not one evaluate can run on: set one of auto, cpu, gpu, cuda, mps"),
])
def test_a_missing_or_unknown_accelerator_is_one_clear_error(machine, accelerator, words):
    machine(False, False)
    with pytest.raises(ParamsError) as e:
        resolve_device(accelerator)
    assert words in str(e.value)
    if "not available" in words:
        assert "set train.accelerator to auto or cpu" in str(e.value)


def test_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_name(torch.device("cpu")) == "cpu" and device_name(torch.device("mps")) == "mps"
    assert device_name(torch.device("cuda")) == "cuda:NVIDIA H200"
