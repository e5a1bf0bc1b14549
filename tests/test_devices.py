import concurrent.futures
import multiprocessing
import resource

import psutil
import pytest
import torch

from devices import allow_tf32, available_memory, gpu_peak_tflops, peak_tflops


@pytest.mark.parametrize("name, bfloat16, float32", [
    ("NVIDIA L40", 181.0, 90.5),
    ("NVIDIA L4", 121.0, 60.5),
    ("NVIDIA L40S", 362.0, 181.0),
    ("NVIDIA H100 80GB HBM3", 989.0, 494.5),
    ("NVIDIA H100 PCIe", 756.0, 378.0),
    ("NVIDIA H100 NVL", 835.0, 417.5),
    ("NVIDIA H200", 989.0, 494.5),
    ("NVIDIA A100-SXM4-40GB", 312.0, 156.0),
])
def test_a_gpu_peak_is_looked_up_by_its_exact_name_and_float32_is_tf32(name, bfloat16, float32):
    assert gpu_peak_tflops(name, torch.bfloat16) == gpu_peak_tflops(name, torch.float16) == bfloat16
    assert gpu_peak_tflops(name, torch.float32) == float32


def test_gpus_without_bf16_have_an_fp16_peak_only():
    assert gpu_peak_tflops("Tesla T4", torch.float16) == 65.0
    assert gpu_peak_tflops("Tesla T4", torch.float32) == 8.1
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", torch.bfloat16) is None


@pytest.mark.parametrize("name", ["NVIDIA L40G", "NVIDIA H100", "NVIDIA GeForce RTX 4090", "L4", "NVIDIA A10G", ""])
def test_a_gpu_whose_name_only_contains_a_known_one_has_no_peak(name):
    assert gpu_peak_tflops(name, torch.bfloat16) is None


def test_no_peak_is_known_for_a_cpu_from_the_table():
    assert peak_tflops(torch.device("cpu"), torch.float32) is None


def test_tf32_is_allowed_so_that_inductor_can_still_read_the_precision_back():
    try:
        allow_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"  # inductor's autotuning reads it so
    finally:
        torch.set_float32_matmul_precision("highest")


def memory_under_address_space_limit(size: int) -> tuple[int, int]:
    resource.setrlimit(resource.RLIMIT_AS, (size, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return available_memory(torch.device("cpu")), psutil.Process().memory_info().vms


def test_the_memory_available_on_the_cpu_is_within_the_address_space_limit():
    """`ulimit -v` bounds what a process may allocate whatever the machine has free, so the memory checks
    (pre-training's, the adapters', the batches') count what is left of it. Measured in a child: the limit stays
    there."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
        limit = psutil.Process().memory_info().vms + 2**30
        available, mapped = child.submit(memory_under_address_space_limit, limit).result()
    assert 0 < available < psutil.virtual_memory().available
    assert abs(available - (limit - mapped)) < 2**24  # what the child mapped between the two readings
    assert available_memory(torch.device("cpu")) > available
