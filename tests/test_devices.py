import pytest
import torch

from devices import compute_dtype, gpu_peak_tflops, peak_tflops


@pytest.mark.parametrize("name, bfloat16, float32", [
    ("NVIDIA L40", 181.0, 90.5),
    ("NVIDIA L4", 121.0, 30.3),
    ("NVIDIA L40S", 362.0, 91.6),
    ("NVIDIA H100 80GB HBM3", 989.0, 67.0),
    ("NVIDIA H100 PCIe", 756.0, 51.0),
    ("NVIDIA H100 NVL", 835.0, 60.0),
    ("NVIDIA H200", 989.0, 67.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 19.5),
])
def test_a_gpu_peak_is_looked_up_by_its_exact_name(name, bfloat16, float32):
    assert gpu_peak_tflops(name, torch.bfloat16) == bfloat16
    assert gpu_peak_tflops(name, torch.float32) == float32


@pytest.mark.parametrize("name", ["NVIDIA L40G", "NVIDIA H100", "NVIDIA GeForce RTX 4090", "L4", "NVIDIA A10G", ""])
def test_a_gpu_whose_name_only_contains_a_known_one_has_no_peak(name):
    assert gpu_peak_tflops(name, torch.bfloat16) is None


def test_no_peak_is_known_for_a_cpu_or_for_a_dtype_outside_the_table():
    assert peak_tflops(torch.device("cpu"), torch.float32) is None
    assert gpu_peak_tflops("NVIDIA L4", torch.float16) is None


def test_the_cpu_computes_in_float32_even_with_mixed_precision():
    assert compute_dtype(torch.device("cpu"), mixed_precision=True) == torch.float32
