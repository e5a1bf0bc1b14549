"""Which device to run on, and the precision to compute in there."""

from contextlib import AbstractContextManager, nullcontext

import psutil
import torch


def best_device() -> str:
    """The fastest device here: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> None:
    """Raise a one-line ValueError when `device` cannot be used on this machine."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"{device!r} is not a device name; use cuda, mps or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device!r} was asked for, but no CUDA GPU is available here; use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{device!r} was asked for, but MPS is not available here; use cpu")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"{device!r} is not supported; use cuda, mps or cpu")


def autocast(device: torch.device, mixed_precision: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA devices that support it; full precision elsewhere."""
    if mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def available_memory(device: torch.device) -> int:
    """The bytes free for tensors on the device now: a GPU's free memory, what MPS recommends less what it holds,
    or the memory the system has available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return psutil.virtual_memory().available
