"""Which device to run on, the precision to compute in there, and how fast it can compute."""

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


def compute_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype:
    """What the matrix products compute in: bf16 with mixed precision on CUDA devices that support it, else fp32."""
    if mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, mixed_precision: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA devices that support it; full precision elsewhere."""
    if compute_dtype(device, mixed_precision) == torch.bfloat16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


# Dense (no sparsity) peak tensor TFLOPS from NVIDIA's datasheets, bf16 and fp32 (no TF32), by the exact name
# torch.cuda.get_device_name() reports: a substring would take an L40 for an L4.
GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {torch.bfloat16: 989.0, torch.float32: 67.0},
    "NVIDIA H100 PCIe": {torch.bfloat16: 756.0, torch.float32: 51.0},
    "NVIDIA H100 NVL": {torch.bfloat16: 835.0, torch.float32: 60.0},
    "NVIDIA H200": {torch.bfloat16: 989.0, torch.float32: 67.0},
    "NVIDIA H200 NVL": {torch.bfloat16: 835.0, torch.float32: 60.0},
    "NVIDIA A100-SXM4-80GB": {torch.bfloat16: 312.0, torch.float32: 19.5},
    "NVIDIA A100-SXM4-40GB": {torch.bfloat16: 312.0, torch.float32: 19.5},
    "NVIDIA A100 80GB PCIe": {torch.bfloat16: 312.0, torch.float32: 19.5},
    "NVIDIA A100-PCIE-40GB": {torch.bfloat16: 312.0, torch.float32: 19.5},
    "NVIDIA L40S": {torch.bfloat16: 362.0, torch.float32: 91.6},
    "NVIDIA L40": {torch.bfloat16: 181.0, torch.float32: 90.5},
    "NVIDIA L4": {torch.bfloat16: 121.0, torch.float32: 30.3},
    "NVIDIA A10": {torch.bfloat16: 125.0, torch.float32: 31.2},
}


def gpu_peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak of the GPU called exactly `name`, or None for a GPU not in the table."""
    return GPU_PEAK_TFLOPS.get(name.strip(), {}).get(dtype)


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak TFLOPS in dtype, for MFU, or None where it is not known (other GPUs, CPUs, MPS)."""
    if device.type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(device), dtype)
    return None


def available_memory(device: torch.device) -> int:
    """The bytes free for tensors on the device now: a GPU's free memory, what MPS recommends less what it holds,
    or the memory the system has available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return psutil.virtual_memory().available
