"""Where a model runs and at which precision: chosen once, at the edge (CLI, service, benchmark), then passed in.

Devices: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N".
Precisions: "fp32", "bf16", "fp16", or "auto" — fp32 on the CPU (most CPUs have no fast half-precision
arithmetic, so half precision is slower there and only changes the numbers), bf16 on a GPU (tensor cores, half
the memory traffic, and float32's range, so no loss scaling is needed; fp16 where the GPU has no bf16).
"""

from __future__ import annotations

import torch

from de3bert.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device a name stands for, or a DeviceError saying why it is not there."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"unknown device '{name}'; use one of {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' is not available: this machine has no usable CUDA GPU "
                          "(torch.cuda.is_available() is False); use --device cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise DeviceError(f"device '{name}' is not available: this machine has {count} CUDA GPU"
                          f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return torch.device(f"cuda:{index}" if index else f"cuda:{torch.cuda.current_device()}")


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished the work queued on it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(name: str | None, device: torch.device) -> str:
    """The precision ("fp32", "bf16" or "fp16") a name stands for on a device, or a DeviceError."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in DTYPES:
        raise DeviceError(f"unknown precision '{name}'; use one of {', '.join(PRECISIONS)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{device} does not support bf16; use --precision fp16 or fp32")
    return name
