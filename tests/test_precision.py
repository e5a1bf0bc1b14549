"""The precision each device computes in, the loss it reaches there, and fp16's loss scaling."""

import importlib.util

import pytest
import torch
from conftest import REPOSITORY, tiny_model

from devices import (
    PRECISION_NAMES,
    autocast,
    choose_dtype,
    compute_dtype,
    cpu_bf16_is_fast,
    cpu_computes_natively,
    gradient_scaler,
)
from training import evaluate, optimizer_step

CPU = torch.device("cpu")
SCRIPTS = ("pre-train.py", "instruction-tune.py", "generate.py", "beam_search.py", "bench.py")


def script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("-", "_"), REPOSITORY / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device_type, native_bf16, expected", [
    ("cuda", True, torch.bfloat16),  # compute capability 8.0 and up
    ("cuda", False, torch.float16),  # T4, V100: tensor cores in fp16, bf16 only emulated
    ("cpu", True, torch.bfloat16),  # AVX-512 BF16 or AMX
    ("cpu", False, torch.float32),  # bf16 and fp16 emulated, slower than fp32
    ("mps", False, torch.float32),
])
def test_auto_is_native_bf16_else_fp16_on_cuda_else_fp32(device_type, native_bf16, expected):
    assert choose_dtype("auto", device_type, native_bf16) == expected


@pytest.mark.parametrize("name, instructions, fast", [
    ("Intel Xeon Platinum 8480+", ("avx512_bf16", "amx_bf16"), True),  # Sapphire Rapids: AMX
    ("Intel Xeon Platinum 8380H", ("avx512_bf16",), False),  # Cooper Lake: AVX-512 BF16 alone, 0.63x fp32
    ("Intel Xeon Platinum 8375C", (), False),  # Ice Lake: AVX-512 without BF16
    ("AMD EPYC 9654", ("avx512_bf16",), True),  # Zen 4
    ("AMD EPYC", ("avx512_bf16",), True),  # Zen 5 as a hypervisor names it (docs/performance.md's CPU)
    ("AMD Ryzen 9 7950X", ("avx512_bf16",), True),
    ("AMD EPYC 7763", (), False),  # Zen 3: no AVX-512
])
def test_auto_chooses_bf16_only_on_cpus_where_it_trains_faster_than_fp32(name, instructions, fast):
    capabilities = {"cpu_name": name, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
    capabilities |= dict.fromkeys(instructions, True)
    assert cpu_bf16_is_fast(capabilities) == fast
    assert choose_dtype("auto", "cpu", cpu_bf16_is_fast(capabilities)) == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("device_type", ["cuda", "cpu", "mps"])
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_an_explicit_precision_is_used_on_every_device(device_type, precision, dtype):
    for native_bf16 in (False, True):
        assert choose_dtype(precision, device_type, native_bf16) == dtype


def test_a_16_bit_dtype_that_this_cpu_emulates_is_used_with_a_warning(recwarn):
    emulated = [dtype for dtype in (torch.bfloat16, torch.float16) if not cpu_computes_natively(dtype)]
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert compute_dtype(precision, CPU) == dtype
    assert [str(warning.message).split(":")[0] for warning in recwarn] == [
        f"--precision {PRECISION_NAMES[dtype]}" for dtype in emulated]
    recwarn.clear()
    compute_dtype("auto", CPU)
    compute_dtype("fp32", CPU)
    assert not recwarn  # auto chooses a dtype this CPU computes in natively


def test_only_fp16_scales_the_loss():
    assert gradient_scaler(CPU, torch.float16).is_enabled()
    assert not gradient_scaler(CPU, torch.bfloat16).is_enabled()
    assert not gradient_scaler(CPU, torch.float32).is_enabled()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_takes_precision_and_mixed_precision_as_its_alias(name):
    module = script(name)
    assert module.parse_args(["--precision", "bf16"]).precision == "bf16"
    assert module.parse_args([]).precision == "auto"
    assert module.parse_args(["--mixed_precision"]).precision == "auto"
    assert module.parse_args(["--no-mixed_precision"]).precision == "fp32"


# A corpus with 2 nats of irreducible entropy: each token is followed by one of 8 tokens, drawn uniformly, so the
# loss falls from ln(97) = 4.6 towards ln(8) = 2.08 (3.2 after 60 steps) and 2% of it is over 0.04 nats.
def successor_windows(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    successors = torch.randperm(97, generator=torch.Generator().manual_seed(0))[:8]
    tokens = [torch.randint(0, 97, (count,), generator=generator)]
    for _ in range(16):
        choice = torch.randint(0, 8, (count,), generator=generator)
        tokens.append((tokens[-1] + successors[choice]) % 97)
    tokens = torch.stack(tokens, 1)
    return tokens[:, :-1], tokens[:, 1:]


def trained_validation_loss(dtype: torch.dtype, steps: int = 60) -> float:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    precision, scaler = autocast(CPU, dtype), gradient_scaler(CPU, dtype)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs, targets = successor_windows(16, data)
        optimizer_step(model, optimizer, [(inputs, targets, 1.0)], 1e-2, 1.0, precision, scaler)
    held_out = successor_windows(64, torch.Generator().manual_seed(2))
    return evaluate(model, [(*held_out, 1.0)], precision)[0]


@pytest.mark.slow  # four training runs, one in fp16, which this CPU only emulates: minutes
def test_auto_bf16_and_fp16_reach_the_validation_loss_of_fp32_within_two_percent():
    fp32 = trained_validation_loss(torch.float32)
    assert fp32 < 0.8 * trained_validation_loss(torch.float32, steps=0)  # it learned
    for dtype in {compute_dtype("auto", CPU), torch.bfloat16, torch.float16}:
        assert trained_validation_loss(dtype) == pytest.approx(fp32, rel=0.02), dtype


def test_fp16_clips_the_unscaled_gradient_and_skips_a_step_that_overflows():
    inputs, targets = successor_windows(4, torch.Generator().manual_seed(0))
    norms = []
    for dtype in (torch.float32, torch.float16):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters())
        _, norm, _, _ = optimizer_step(model, optimizer, [(inputs, targets, 1.0)], 0.0, 1.0, autocast(CPU, dtype),
                                    gradient_scaler(CPU, dtype))
        norms.append(norm)
    assert norms[1] == pytest.approx(norms[0], rel=0.02)  # not 65,536 times larger

    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # scaled gradients overflow fp16
    optimizer_step(model, torch.optim.SGD(model.parameters()), [(inputs, targets, 1.0)], 1.0, 1.0,
                   autocast(CPU, torch.float16), scaler)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert scaler.get_scale() == 2.0**39
