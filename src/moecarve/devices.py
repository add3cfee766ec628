"""Which device a stage runs on: checked before any model loads, with one error message for all."""

from __future__ import annotations

import platform

import torch


class DeviceError(ValueError):
    """A device this stage or machine cannot use; `why` is the reason without the option's name."""

    def __init__(self, device, why: str):
        super().__init__(f"--device {device}: {why}")
        self.why = why


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(device: str | torch.device, stage: str = "eval") -> torch.device:
    """`device` as cpu, cuda or cuda:N, whatever this machine has (a recipe written for a GPU
    machine is read on a login node too)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise DeviceError(repr(device), "expected cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise DeviceError(device, f"{stage} runs on cpu or cuda")
    return parsed


def resolve_device(device: str | torch.device | None, stage: str = "eval") -> str:
    """`device` (cpu, cuda or cuda:N) checked against this machine, as a string; None: CUDA where
    present."""
    if device is None:
        return default_device()
    parsed = parse_device(device, stage)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(device, "CUDA is not available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(device, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(parsed)


def native_bf16(device: str | torch.device) -> bool | None:
    """Whether `device` multiplies bfloat16 natively: a GPU from Ampere on, an x86 CPU with
    AVX512-BF16 or AMX. Elsewhere bfloat16 is emulated, slower than float32. None where torch cannot
    tell: it has no probe for other CPUs (ARM)."""
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(torch.device(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without the probes
        return False
