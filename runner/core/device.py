"""The one choice of torch device: the spec's ``hardware.device`` (or ``runner serve --device``).

``auto`` takes CUDA when torch sees a CUDA device, else Apple's MPS when it is there, else the CPU.
A device asked for by name that this machine lacks is refused with what to set, instead of
failing later inside torch (``Torch not compiled with CUDA enabled``) or quietly running on the
CPU. Any other name (``cuda:1``, ``xpu``) is passed to torch as given once its kind is there.
"""

from __future__ import annotations

from runner.core.errors import UserError


class DeviceUnavailable(UserError):
    """The device asked for by name is not on this machine."""


def choose_device(preference: str | None = "auto", *, setting: str = "hardware.device") -> str:
    """The torch device to use for ``preference`` (auto, cpu, cuda, cuda:N, mps; None means auto).
    ``setting`` names where the preference came from, for the message when it cannot be had."""
    want = str(preference or "auto").strip().lower()
    if want == "cpu":
        return want
    import torch

    cuda = torch.cuda.is_available()
    mps = _mps_available(torch)
    if want == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    kind, _, index = want.partition(":")
    if kind == "cuda" and not cuda:
        raise DeviceUnavailable(f"{setting} is {preference!r}, but torch sees no CUDA device here "
                                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
                                hint=f"Set {setting} to auto (or cpu) to run here, or run where a CUDA GPU is.")
    if kind == "cuda" and index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise DeviceUnavailable(f"{setting} is {preference!r}, but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)",
                                hint=f"Set {setting} to cuda (the first device) or auto.")
    if kind == "mps" and not mps:
        raise DeviceUnavailable(f"{setting} is {preference!r}, but Apple's MPS backend is not available here",
                                hint=f"Set {setting} to auto (or cpu) to run here.")
    return want


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
