"""The training loop in one process: the epoch log's figures, random-number states across devices, batches onto
the device, saving on a stop."""

import json
import signal

import pytest
import torch
from tqdm import tqdm

from conftest import TINY_SHAPE, tiny_model
from devices import gradient_scaler
from run_log import EpochLog
from training import RunConfig, restore_rng_state, rng_state, saved_device_state, to_device, train


def logged_epoch(tmp_path, **utilization) -> dict:
    """The metrics record of a one-step epoch of 1000 tokens."""
    log = EpochLog(tqdm(disable=True), tmp_path / "run.metrics.jsonl", **utilization)
    log.add_step(1, loss=2.0, gradient_norm=0.5, learning_rate=1e-3)
    log.end_epoch(1, 1, "tokens", 1000, validation_loss=None)
    return json.loads((tmp_path / "run.metrics.jsonl").read_text())


def test_an_epoch_s_mfu_is_its_flops_per_second_over_the_peak(tmp_path):
    record = logged_epoch(tmp_path, flops_per_unit=6e6, peak_flops=2e12)
    assert record["mfu"] == pytest.approx(record["tokens_per_second"] * 6e6 / 2e12)


@pytest.mark.parametrize("utilization", [{}, {"flops_per_unit": 6e6}, {"peak_flops": 2e12}])
def test_without_a_peak_or_the_flops_there_is_no_mfu(tmp_path, utilization):
    assert "mfu" not in logged_epoch(tmp_path, **utilization)


def test_the_cpu_random_state_round_trips_and_a_cpu_process_saves_no_gpu_state():
    state = rng_state(torch.device("cpu"))
    assert state.keys() == {"torch"}
    expected = torch.rand(3)
    restore_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


# The CUDA calls themselves cannot run without a GPU; which saved state a process restores is decided here.
GPU_STATES = [torch.full((16,), index, dtype=torch.uint8) for index in range(8)]


@pytest.mark.parametrize("saved, device, expected", [
    (GPU_STATES[5], "cuda:0", 5),  # today's checkpoints: each process's own GPU state
    (GPU_STATES, "cuda:3", 3),  # older ones kept every visible GPU's: this process's is at its index
    (GPU_STATES[:2], "cuda:3", None),  # written where fewer GPUs were visible: nothing to restore, no IndexError
    (None, "cuda:0", None),  # written on a CPU
    (GPU_STATES[1], "cpu", None),  # resumed on a CPU
])
def test_a_process_restores_its_own_gpu_s_state_only(saved, device, expected):
    state = {"torch": torch.get_rng_state()} | ({"cuda": saved} if saved is not None else {})
    own = saved_device_state(state, torch.device(device))
    assert (own is None) if expected is None else torch.equal(own, GPU_STATES[expected])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_process_saves_and_restores_its_own_gpu_s_generator():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    state = rng_state(device)
    assert torch.equal(state["cuda"], torch.cuda.get_rng_state(device))
    expected = torch.rand(3, device=device)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_batch_reaches_the_gpu_through_pinned_memory():
    batch = torch.arange(12).view(3, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        moved = to_device(batch, torch.device("cuda"))
        torch.cuda.synchronize()
    assert torch.equal(moved.cpu(), batch)
    assert any("Pinned" in event.name for event in profile.events()), [event.name for event in profile.events()]


def test_a_stop_at_the_end_of_an_epoch_saves_once(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, TINY_SHAPE["vocabulary_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    batch = [(tokens[:, :-1], tokens[:, 1:], 1.0)]
    saves = []

    def micro_batches_at(step: int) -> list:
        if step == 3:  # the last step of the second epoch, at which a checkpoint is due anyway
            signal.raise_signal(signal.SIGTERM)
        return batch

    run = RunConfig(num_epochs=5, steps_per_epoch=2, learning_rate=1e-3, warmup_steps=0, max_gradient_norm=1.0,
                    eval_interval=1, checkpoint_interval=2, checkpoint_path=tmp_path / "c.pt", log_dir=None,
                    tensorboard=False, unit="samples", units_per_epoch=4, description="test", saved_what="model",
                    program="test")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:  # saved, then the conventional status of a SIGTERM
            train(model, optimizer, micro_batches_at, batch, lambda step, epoch: saves.append((step, epoch)), run,
                  0, gradient_scaler(torch.device("cpu"), torch.float32))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert saves == [(4, 2)], saves
    assert stopped.value.code == 128 + signal.SIGTERM
