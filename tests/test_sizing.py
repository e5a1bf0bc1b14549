import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import sizing
from conftest import lightgpt
from generation import beam_search
from model import SHAPE_FIELDS, LightGPT, LightGPTConfig

REPOSITORY = Path(__file__).resolve().parent.parent
NOTEBOOK = REPOSITORY / "model_sizing.ipynb"
OPTIMIZERS = {"adafactor": torch.optim.Adafactor, "adamw": torch.optim.AdamW}

# (vocabulary_size, block_size, embedding_dimensions, num_heads, num_layers, feed_forward_ratio[, num_kv_heads])
SHAPES = [(97, 64, 32, 4, 2, 4), (101, 16, 48, 3, 3, 2), (50, 128, 16, 2, 1, 1), (300, 8, 64, 8, 2, 3)]
GQA_SHAPES = [(97, 64, 32, 4, 2, 4, 2), (300, 8, 64, 8, 2, 3, 1)]  # grouped-query attention: a narrower projection


def build(architecture: sizing.Architecture) -> LightGPT:
    return lightgpt(**{name: getattr(architecture, name) for name in SHAPE_FIELDS}, eos_index=0)


def test_the_architecture_is_lightgpt_config_s_shape_with_the_same_types_and_defaults_and_a_context():
    shape = {field.name: field for field in dataclasses.fields(LightGPTConfig) if field.name in SHAPE_FIELDS}
    architecture = {field.name: field for field in dataclasses.fields(sizing.Architecture)}
    assert architecture.keys() == shape.keys() | {"block_size"}
    for name, field in shape.items():
        assert (architecture[name].type, architecture[name].default) == (field.type, field.default), name


def batch(architecture: sizing.Architecture, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, architecture.block_size)
    return (torch.randint(0, architecture.vocabulary_size, shape, generator=generator),
            torch.randint(0, architecture.vocabulary_size, shape, generator=generator))


def saved_bytes(model: LightGPT, x: torch.Tensor, y: torch.Tensor, mixed_precision: bool) -> int:
    """Bytes autograd saves for the backward in one forward pass: each storage once, parameters not counted."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision):
            _, loss = model(x, y)
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("shape", SHAPES + GQA_SHAPES)
def test_parameter_counts_equal_the_models_exactly(shape):
    architecture = sizing.Architecture(*shape)
    model = build(architecture)
    counts = architecture.parameters
    assert counts["total"] == model.num_trainable_params
    assert counts["embedding"] == model.token_embeddings.weight.numel()
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    assert counts["per_block"] == sum(parameter.numel() for parameter in model.blocks[0].parameters())
    assert sorted(architecture.shapes) == sorted(tuple(parameter.shape) for parameter in model.parameters())


@pytest.mark.parametrize("optimizer", sizing.OPTIMIZERS)
def test_optimizer_state_equals_what_the_torch_optimizer_keeps(optimizer):
    architecture = sizing.Architecture(*SHAPES[0])
    model = build(architecture)
    torch_optimizer = OPTIMIZERS[optimizer](model.parameters(), lr=1e-3)
    _, loss = model(*batch(architecture, 2))
    loss.backward()
    torch_optimizer.step()
    kept = sum(value.nbytes for state in torch_optimizer.state.values() for value in state.values())
    assert sizing.optimizer_state_bytes(architecture.shapes, optimizer) == kept


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize("shape", SHAPES[:2] + GQA_SHAPES[:1])
def test_activation_estimate_is_within_20_percent_of_what_autograd_saves(
    shape, activation_checkpointing, mixed_precision
):
    # With checkpointing the hooks see the forward pass only: each block saves its input, and its own
    # activations come back during the backward under checkpoint's hooks, not these.
    architecture = sizing.Architecture(*shape)
    model = build(architecture).train()
    model.enable_activation_checkpointing(activation_checkpointing)
    measured = saved_bytes(model, *batch(architecture, 2), mixed_precision)
    estimate = sizing.activation_bytes(architecture, 2, mixed_precision, activation_checkpointing)
    assert estimate == pytest.approx(measured, rel=0.2)


def peak_training_step_bytes(model: LightGPT, optimizer: torch.optim.Optimizer, x, y, path: Path) -> int:
    """The most CPU memory a whole training step holds, from the profiler's memory timeline."""

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer state, which then exists before the measured step
    return peak_bytes(step, path)


def peak_bytes(work, path: Path) -> int:
    """The most CPU memory work() holds, parameters included, from the profiler's memory timeline."""
    # The memory timeline needs the shapes and the stacks to tell tensors apart.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        work()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a CUDA-only API
        p.export_memory_timeline(str(path), device="cpu")
    _, sizes_by_category = json.loads(path.read_text())
    return max(map(sum, sizes_by_category))


@pytest.mark.parametrize(
    "optimizer, activation_checkpointing", [("adamw", False), ("adafactor", True)], ids=["stored", "checkpointed"]
)
def test_memory_per_device_is_within_20_percent_of_a_training_steps_peak(
    optimizer, activation_checkpointing, tmp_path
):
    architecture = sizing.Architecture(512, 64, 64, 4, 3, 4)
    model = build(architecture).train()
    model.enable_activation_checkpointing(activation_checkpointing)
    torch_optimizer = OPTIMIZERS[optimizer](model.parameters(), lr=1e-3)
    measured = peak_training_step_bytes(model, torch_optimizer, *batch(architecture, 4), tmp_path / "timeline.json")
    estimate = sizing.memory_per_device(architecture, 4, False, optimizer, activation_checkpointing)
    assert estimate["total"] == pytest.approx(measured, rel=0.2)


@pytest.mark.parametrize("vocabulary_size, embedding_dimensions, num_layers, block_size, beam_width, max_tokens", [
    (2048, 16, 2, 32, 8, 4),  # the scores of every next token dominate
    (128, 64, 4, 32, 16, 4),  # the key/value cache dominates
    (128, 64, 4, 8, 16, 5),  # the cache is rebuilt once the context outgrows the block
], ids=["scores", "cache", "rebuilt cache"])
def test_beam_search_memory_is_within_10_percent_of_the_searchs_peak(
    vocabulary_size, embedding_dimensions, num_layers, block_size, beam_width, max_tokens, tmp_path
):
    model = lightgpt(vocabulary_size=vocabulary_size, embedding_dimensions=embedding_dimensions, num_heads=4,
                     num_layers=num_layers, eos_index=0).eval()
    prompt = torch.randint(1, vocabulary_size, (5,), generator=torch.Generator().manual_seed(0))
    measured = peak_bytes(lambda: beam_search(model, prompt, max_tokens, beam_width, 1, 1.0, block_size),
                          tmp_path / "timeline.json") - sum(parameter.nbytes for parameter in model.parameters())
    estimate = sizing.beam_search_bytes(vocabulary_size, embedding_dimensions, num_layers, block_size, beam_width,
                                        max_tokens, prompt_length=5)
    assert estimate == pytest.approx(measured, rel=0.1)


def test_checkpointing_saves_a_fraction_of_the_activations():
    architecture = sizing.Architecture(97, 64, 32, 4, 4, 4)
    stored, checkpointed = (sizing.activation_bytes(architecture, 2, False, flag) for flag in (False, True))
    model = build(architecture).train()
    model.enable_activation_checkpointing(True)
    assert saved_bytes(model, *batch(architecture, 2), False) < 0.5 * stored
    assert checkpointed < 0.5 * stored


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], (97, 16, 64, 4, 2, 4), GQA_SHAPES[1]])
def test_flops_estimate_is_within_10_percent_of_the_flop_counter(shape):
    # On the CPU, SDPA runs a fused kernel that FlopCounterMode does not count; the math backend computes and
    # counts the full T x T attention products, as the training_flops_per_token docstring assumes.
    architecture = sizing.Architecture(*shape)
    model = build(architecture)
    x, y = batch(architecture, 2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(x, y)
        loss.backward()
    counted = counter.get_total_flops()
    assert sizing.training_flops(architecture.flops_per_token, x.numel()) == pytest.approx(counted, rel=0.1)


def test_the_attention_term_matters_where_the_context_is_long():
    architecture = sizing.Architecture(50, 128, 16, 2, 1, 1)
    six_n = 6 * architecture.parameters["total"]
    assert architecture.flops_per_token > 1.5 * six_n


def test_sharding_divides_gradients_and_optimizer_state_and_level_3_the_parameters():
    architecture = sizing.Architecture(50257, 1024, 1024, 16, 24)

    def memory(level: int, world_size: int) -> dict:
        return sizing.memory_per_device(architecture, 4, True, "adamw", False, level, world_size)

    replicated, level_2, level_3 = memory(0, 8), memory(2, 8), memory(3, 8)
    assert replicated == memory(0, 1)
    assert level_2["gradients"] < replicated["gradients"] / 2
    assert level_2["optimizer_state"] == pytest.approx(replicated["optimizer_state"] / 8, rel=0.01)
    assert level_2["parameters"] > replicated["parameters"]  # full parameters beside their shards
    assert level_3["parameters"] < replicated["parameters"] / 2
    assert level_3["total"] < level_2["total"] < replicated["total"]
    assert memory(3, 64)["total"] < level_3["total"]
    assert replicated["activations"] == level_3["activations"]


def test_with_accumulation_level_2_keeps_the_whole_gradients_and_level_3_only_shards():
    # What tests/test_distributed.py measures FSDP2 keeping between two micro-batches at each level.
    architecture = sizing.Architecture(50257, 1024, 1024, 16, 24)

    def gradients(level: int, micro_batches: int) -> float:
        return sizing.memory_per_device(architecture, 1, True, "adamw", False, level, 8, micro_batches)["gradients"]

    whole = 4 * architecture.parameters["total"]
    assert gradients(2, 1) == gradients(3, 1) == gradients(3, 16) < whole / 2
    assert gradients(2, 16) > whole
    with pytest.raises(ValueError, match="micro_batches must be at least 1"):
        sizing.memory_per_device(architecture, micro_batches=0)


def test_fits_compares_the_total_with_the_device_memory():
    architecture = sizing.Architecture(50257, 2048, 4096, 64, 64)
    memory = sizing.memory_per_device(architecture, 1, True, "adafactor", True, 0, 1)
    assert not sizing.fits(memory, 80 * 2**30)
    assert sizing.fits(memory, 2 * memory["total"])


def test_training_time_falls_with_more_devices_and_a_higher_mfu():
    flops = sizing.training_flops(sizing.Architecture(50257, 1024, 1024, 16, 24).flops_per_token, 9e9)
    one = sizing.training_seconds(flops, 989e12, 0.4)
    assert sizing.training_seconds(flops, 989e12, 0.4, world_size=8) == pytest.approx(one / 8)
    assert sizing.training_seconds(flops, 989e12, 0.2) == pytest.approx(2 * one)


def test_bad_choices_are_refused_in_one_line():
    architecture = sizing.Architecture(*SHAPES[0])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        sizing.optimizer_state_bytes(architecture.shapes, "sgd")
    with pytest.raises(ValueError, match="ddp_sharding_level must be one of"):
        sizing.memory_per_device(architecture, ddp_sharding_level=1)


def test_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_and_draws_its_charts_writing_no_file(tmp_path, monkeypatch):
    # jupyter execute, on copies, so that a file written by mistake lands here
    for name in (NOTEBOOK.name, "sizing.py"):
        shutil.copy(REPOSITORY / name, tmp_path)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline
    result = subprocess.run(
        [sys.executable, "-m", "jupyter", "execute", NOTEBOOK.name, "--output", "executed"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    cells = json.loads((tmp_path / "executed.ipynb").read_text())["cells"]
    outputs = [output for cell in cells if cell["cell_type"] == "code" for output in cell["outputs"]]
    assert not [output for output in outputs if output["output_type"] == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["executed.ipynb", NOTEBOOK.name, "sizing.py"]


@pytest.mark.slow
def test_the_readme_s_headless_command_prints_the_notebook_s_tables(tmp_path):
    for name in (NOTEBOOK.name, "sizing.py"):
        shutil.copy(REPOSITORY / name, tmp_path)
    command = re.search(r"^(ipython \S+\.ipynb)$", (REPOSITORY / "README.md").read_text(), re.M).group(1)
    result = subprocess.run([sys.executable, "-m", "IPython", *command.split()[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=os.environ | {"MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr
    for table_line in ("GiB per device", "activation checkpointing:", "training FLOPs per token"):
        assert table_line in result.stdout, result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == [NOTEBOOK.name, "sizing.py"]
