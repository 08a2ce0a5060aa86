"""runner.core.device.choose_device: auto prefers CUDA, then MPS, then the CPU; a device asked for
by name that the machine lacks is refused with the setting to change (every machine shape is
simulated by patching what torch reports)."""

from __future__ import annotations

import itertools

import pytest
import torch

from runner.core.device import DeviceUnavailable, choose_device
from runner.core.errors import UserError

SHAPES = list(itertools.product([0, 1, 2], [False, True]))  # (CUDA devices, MPS available)


@pytest.fixture
def machine(monkeypatch):
    def shape(cuda_devices: int, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return shape


@pytest.mark.parametrize("cuda_devices,mps", SHAPES)
def test_auto_takes_the_best_device_there_is(machine, cuda_devices, mps):
    machine(cuda_devices, mps)
    want = "cuda" if cuda_devices else "mps" if mps else "cpu"
    for pref in ("auto", "AUTO", " auto ", None, ""):
        assert choose_device(pref) == want
    assert choose_device() == want


@pytest.mark.parametrize("cuda_devices,mps", SHAPES)
def test_a_named_device_is_used_when_there_and_refused_when_not(machine, cuda_devices, mps):
    machine(cuda_devices, mps)
    assert choose_device("cpu") == "cpu"
    cases = {"cuda": cuda_devices > 0, "mps": mps,
             **{f"cuda:{i}": i < cuda_devices for i in range(3)}}
    for pref, there in cases.items():
        if there:
            assert choose_device(pref) == pref
            continue
        with pytest.raises(DeviceUnavailable) as err:
            choose_device(pref, setting="--device")
        assert isinstance(err.value, UserError)
        assert repr(pref) in err.value.message and "--device" in err.value.message
        assert "--device" in err.value.hint and ("auto" in err.value.hint or "cuda" in err.value.hint)


def test_a_bad_cuda_index_is_refused(machine):
    machine(1, False)
    for pref in ("cuda:x", "cuda:-1", "cuda:1"):
        with pytest.raises(DeviceUnavailable, match="hardware.device"):
            choose_device(pref)
