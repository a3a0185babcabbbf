"""train.accelerator -> the torch device evaluate runs on, with torch's view of the machine faked.

    .venv/bin/python -m pytest tests/components/test_device.py -q
"""
import pytest
import torch

from components import device
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


# train.precision: auto, with the CPU's flags and the CUDA GPU's bf16 support faked


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16-mixed"),
    ({"avx2", "fma", "avx512f"}, "32-true"),            # AVX-512 without its bf16 extension: emulated
    (set(), "32-true"),                                  # no /proc/cpuinfo (not Linux)
])
def test_auto_precision_on_cpu_follows_its_bf16_flags(machine, monkeypatch, flags, expected):
    machine(False, False)
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    precision, why = device.resolve_precision("auto", "auto", device.BF16_MIN_WIDTH)
    assert precision == expected and why


def test_auto_precision_needs_the_crossover_width(machine, monkeypatch):
    machine(False, False)
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512_bf16"})
    narrow, why = device.resolve_precision("auto", "cpu", device.BF16_MIN_WIDTH - 1)
    assert narrow == "32-true" and f"< {device.BF16_MIN_WIDTH}" in why
    assert device.resolve_precision("auto", "cpu", device.BF16_MIN_WIDTH)[0] == "bf16-mixed"
    assert device.resolve_precision("auto", "cpu", 0)[0] == "32-true"    # width unknown


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_cuda_asks_torch(machine, monkeypatch, bf16, expected):
    machine(True, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: bf16)
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512_bf16"})   # the CPU's flags do not matter
    assert device.resolve_precision("auto", "auto", 4 * device.BF16_MIN_WIDTH)[0] == expected


def test_auto_precision_on_mps_is_fp32(machine):
    machine(False, True)
    assert device.resolve_precision("auto", "auto", 4 * device.BF16_MIN_WIDTH)[0] == "32-true"


def test_a_set_precision_is_passed_through(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: set())
    for p in ("32-true", "bf16-mixed", "16-mixed"):
        assert device.resolve_precision(p, "cpu", 64) == (p, "set in train.precision")
