"""Which device to run on, the precision to compute in there, whether to compile, and how fast it can compute."""

import math
import warnings
from contextlib import AbstractContextManager, nullcontext

import psutil
import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


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


def has_native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 in hardware, fast: a CUDA GPU of compute capability 8.0 or more
    (is_bf16_supported's default also says yes to T4 and V100, which emulate it slowly), or a CPU on which bf16
    trains faster than float32 (cpu_bf16_is_fast)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_is_fast(torch.cpu.get_capabilities())
    return False


def cpu_bf16_is_fast(capabilities: dict) -> bool:
    """Whether bf16 trains faster than float32 on a CPU with these torch.cpu.get_capabilities(): with Intel's AMX,
    or with AVX-512 BF16 on AMD's (Zen 4 and later). Intel's AVX-512 BF16 without AMX (Cooper Lake) is not
    counted: an AMX Xeon with oneDNN capped at it trained bf16 at 0.63x fp32's speed (docs/performance.md)."""
    if capabilities.get("amx_bf16"):
        return True
    return bool(capabilities.get("avx512_bf16")) and str(capabilities.get("cpu_name", "")).startswith("AMD")


# The x86 instructions that compute in a 16-bit dtype; without them a CPU converts to float32 and back.
CPU_INSTRUCTIONS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name) for name in CPU_INSTRUCTIONS[dtype])


def choose_dtype(precision: str, device_type: str, native_bf16: bool) -> torch.dtype:
    """The dtype to compute in for --precision on a kind of device: a pure function of what the device can do,
    so that the CUDA choices are tested on any machine. `auto` is bf16 where the hardware has it fast; fp16 on
    other CUDA GPUs (tensor cores, with a GradScaler); fp32 on other CPUs, where bf16 and fp16 are emulated or
    measured slower, and on MPS (not measured)."""
    if precision != "auto":
        return PRECISIONS[precision]
    if native_bf16 and device_type in ("cuda", "cpu"):
        return torch.bfloat16
    return torch.float16 if device_type == "cuda" else torch.float32


def allow_tf32() -> None:
    """Let CUDA's float32 matrix products use TF32, through the API that inductor reads back: setting
    torch.backends.cuda.matmul.fp32_precision alone makes torch.get_float32_matmul_precision(), which inductor's
    autotuning calls, raise."""
    torch.set_float32_matmul_precision("high")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """choose_dtype for this device as it is; on CUDA it also lets float32 matrix products use TF32. A 16-bit
    dtype asked of a CPU that only emulates it is used, with a warning: it trains many times slower than fp32."""
    if device.type == "cuda":
        allow_tf32()
    native_bf16 = has_native_bf16(device)
    dtype = choose_dtype(precision, device.type, native_bf16)
    if device.type == "cpu" and dtype != torch.float32 and not cpu_computes_natively(dtype):
        auto = PRECISION_NAMES[choose_dtype("auto", device.type, native_bf16)]
        warnings.warn(f"--precision {precision}: this CPU has no {PRECISION_NAMES[dtype]} instructions and emulates "
                      f"it, many times slower than fp32 (auto chooses {auto} here)")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to dtype; full precision when it is float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def gradient_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler that works only under fp16, whose small range would flush small gradients to zero; under
    other dtypes its calls pass the loss and the step through unchanged. Under FSDP2 its check for overflow runs
    on DTensor gradients, so every rank finds what any rank's shard holds and all skip the same steps."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def compiles(flag: bool | None, device: torch.device) -> bool:
    """--compile as given, else on where it measured faster: CUDA (docs/performance.md)."""
    return flag if flag is not None else device.type == "cuda"


# Dense (no sparsity) peak tensor TFLOPS from NVIDIA's datasheets by the exact name torch.cuda.get_device_name()
# reports (a substring would take an L40 for an L4). From Ampere on, bf16 and fp16 share a peak, and float32 runs
# as TF32 (compute_dtype turns it on) at half of it; V100 and T4 have no bf16 and no TF32.
def _tensor_peaks(sixteen_bit: float, fp32: float | None = None) -> dict[torch.dtype, float]:
    if fp32 is not None:
        return {torch.float16: sixteen_bit, torch.float32: fp32}
    return {torch.bfloat16: sixteen_bit, torch.float16: sixteen_bit, torch.float32: sixteen_bit / 2}


GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": _tensor_peaks(989.0),
    "NVIDIA H100 PCIe": _tensor_peaks(756.0),
    "NVIDIA H100 NVL": _tensor_peaks(835.0),
    "NVIDIA H200": _tensor_peaks(989.0),
    "NVIDIA H200 NVL": _tensor_peaks(835.0),
    "NVIDIA A100-SXM4-80GB": _tensor_peaks(312.0),
    "NVIDIA A100-SXM4-40GB": _tensor_peaks(312.0),
    "NVIDIA A100 80GB PCIe": _tensor_peaks(312.0),
    "NVIDIA A100-PCIE-40GB": _tensor_peaks(312.0),
    "NVIDIA L40S": _tensor_peaks(362.0),
    "NVIDIA L40": _tensor_peaks(181.0),
    "NVIDIA L4": _tensor_peaks(121.0),
    "NVIDIA A10": _tensor_peaks(125.0),
    "Tesla V100-SXM2-16GB": _tensor_peaks(125.0, 15.7),
    "Tesla V100-SXM2-32GB": _tensor_peaks(125.0, 15.7),
    "Tesla V100-PCIE-16GB": _tensor_peaks(112.0, 14.0),
    "Tesla T4": _tensor_peaks(65.0, 8.1),
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
    or the memory the system has available, within what is left of this process's address-space limit
    (`ulimit -v`), past which allocations fail."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return min(psutil.virtual_memory().available, address_space_left())


def address_space_left() -> float:
    """What this process may still map under its RLIMIT_AS (Linux and BSDs), or infinity where it has none."""
    if not hasattr(psutil, "RLIMIT_AS"):
        return math.inf
    limit, _ = psutil.Process().rlimit(psutil.RLIMIT_AS)
    return math.inf if limit == psutil.RLIM_INFINITY else max(0, limit - psutil.Process().memory_info().vms)
