"""A diverged run never overwrites a good checkpoint: steps whose gradient norm is not finite are skipped and, a few
in a row, stop the run; weights that are not finite are never saved; the metrics stay JSON."""

import functools
import json
import math
import signal

import pytest
import torch
from tqdm import tqdm

from conftest import TINY_SHAPE, assert_one_line_error, run_script, save_pretrained_checkpoint, tiny_model
from devices import gradient_scaler
from optimizers import Adafactor
from run_log import EpochLog, perplexity
from training import NON_FINITE_STEPS_TO_STOP, RunConfig, optimizer_step, train

CPU_FP32_SCALER = gradient_scaler(torch.device("cpu"), torch.float32)


def batch() -> list[tuple]:
    tokens = torch.randint(0, TINY_SHAPE["vocabulary_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    return [(tokens[:, :-1], tokens[:, 1:], 1.0)]


def poison_gradients(model, value: float, on_steps=None) -> list[int]:
    """Make the embedding's gradient `value` (inf, nan) on the steps in on_steps (every step when None), as a
    diverging run's gradients become; returns the list of the steps' numbers, to be advanced by the caller."""
    step = [0]
    model.token_embeddings.weight.register_hook(
        lambda gradient: gradient.fill_(value) if on_steps is None or step[0] in on_steps else gradient)
    return step


def strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_step_whose_gradient_norm_is_not_finite_leaves_the_weights_as_they_were(value):
    model = tiny_model()
    poison_gradients(model, value)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loss, gradient_norm, _, _ = optimizer_step(model, optimizer, batch(), 1e-2, 1.0,
                                               torch.autocast("cpu", enabled=False), CPU_FP32_SCALER)
    assert math.isfinite(loss) and not math.isfinite(gradient_norm)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not optimizer.state  # the optimizer's moments took nothing from the step either


def run(tmp_path, model, optimizer, micro_batches_at, saves, num_epochs=4, learning_rate=1e-3, **options):
    """train() for num_epochs epochs of one step, each saved (save appends the weights' finiteness); returns the
    message of its stop, or None when it ended."""
    run_config = RunConfig(**dict(num_epochs=num_epochs, steps_per_epoch=1, learning_rate=learning_rate, warmup_steps=0,
                                  max_gradient_norm=1.0, eval_interval=1, checkpoint_interval=1,
                                  checkpoint_path=tmp_path / "c.pt", log_dir=None, tensorboard=False, unit="samples",
                                  units_per_epoch=2, description="test", saved_what="model", program="test")
                           | options)

    def save(step, epoch):
        saves.append((step, all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())))

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(model, optimizer, micro_batches_at, batch(), save, run_config, 0, CPU_FP32_SCALER)
    except SystemExit as stop:
        return str(stop.code)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return None


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_run_whose_gradient_norm_stays_non_finite_stops_with_one_line_and_saves_unchanged_weights(tmp_path, value):
    model = tiny_model()
    poison_gradients(model, value)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    saves = []
    message = run(tmp_path, model, torch.optim.AdamW(model.parameters()), lambda step: batch(), saves, num_epochs=10)
    assert message.startswith("test: error: at step") and "in a row" in message and "\n" not in message
    assert len(saves) == NON_FINITE_STEPS_TO_STOP - 1 and all(finite for _, finite in saves)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_single_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path):
    model = tiny_model()
    step = poison_gradients(model, math.inf, on_steps={1})

    def micro_batches_at(number):
        step[0] = number
        return batch()

    saves = []
    assert run(tmp_path, model, torch.optim.AdamW(model.parameters()), micro_batches_at, saves) is None
    assert [number for number, _ in saves] == [1, 2, 3, 4]
    records = [strict_json(line) for line in (tmp_path / "c.metrics.jsonl").read_text().splitlines()]
    assert records[1]["gradient_norm"] is None and records[2]["gradient_norm"] > 0


OPTIMIZERS = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD,
              "Adafactor": functools.partial(Adafactor, scale_parameter=False)}  # pre-training's Adafactor


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("learning_rate", [1e10, 1e30])
def test_a_run_with_a_huge_learning_rate_stops_with_one_line_and_saves_only_a_sound_model(tmp_path, optimizer,
                                                                                          learning_rate):
    model = tiny_model()
    saves = []
    optimizer = OPTIMIZERS[optimizer](model.parameters(), lr=learning_rate)
    message = run(tmp_path, model, optimizer, lambda step: batch(), saves, num_epochs=8, learning_rate=learning_rate)
    assert message.startswith("test: error: at step") and "\n" not in message
    assert all(finite for _, finite in saves)
    for line in (tmp_path / "c.metrics.jsonl").read_text().splitlines():
        record = strict_json(line)
        if record["step"] in dict(saves):
            assert record["validation_loss"] is not None  # what was saved evaluated to a finite loss


def test_weights_that_overflow_are_never_saved(tmp_path):
    model = tiny_model()
    model.token_embeddings.weight.register_hook(lambda gradient: gradient * 1e10)
    saves = []
    # A step past the largest float (1e10 x 1e30), at an epoch that is saved but not evaluated.
    message = run(tmp_path, model, torch.optim.SGD(model.parameters(), lr=1e30), lambda step: batch(), saves,
                  learning_rate=1e30, max_gradient_norm=1e10, eval_interval=2)
    assert saves == [] and "at step 1, the weights hold NaN or infinite numbers" in message


def test_a_huge_validation_loss_has_an_infinite_perplexity_and_the_metrics_stay_json(tmp_path):
    assert perplexity(1e5) == math.inf and perplexity(709.0) == pytest.approx(math.exp(709.0))
    log = EpochLog(tqdm(disable=True), tmp_path / "run.metrics.jsonl")
    for loss, gradient_norm, validation_loss in ((2.0, math.nan, 1e5), (math.inf, 1.0, math.nan)):
        log.add_step(1, loss=loss, gradient_norm=gradient_norm, learning_rate=1e-3)
        log.end_epoch(1, 1, "tokens", 1000, validation_loss=validation_loss)
    first, second = map(strict_json, (tmp_path / "run.metrics.jsonl").read_text().splitlines())
    assert first["validation_loss"] == 1e5 and first["validation_perplexity"] is None
    assert first["gradient_norm"] is None and second["loss"] is None and second["validation_loss"] is None


TINY = ["--embedding_dimensions", "16", "--num_attention_heads", "2", "--num_hidden_layers", "1", "--block_size", "16",
        "--feed_forward_ratio", "2", "--device", "cpu", "--batch_size", "4", "--gradient_accumulation_steps", "1",
        "--samples_per_epoch", "8", "--eval_samples", "8", "--checkpoint_interval", "1", "--no-tensorboard"]


@pytest.mark.slow
def test_resuming_with_a_huge_learning_rate_keeps_the_good_checkpoint(tmp_path, dataset_path):
    checkpoint = tmp_path / "checkpoint.pt"
    pretrain = ("pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path",
                checkpoint, *TINY, "--optimizer", "adamw")
    assert run_script(*pretrain, "--num_epochs", "1").returncode == 0
    result = run_script(*pretrain, "--num_epochs", "6", "--resume", "--learning_rate", "1e30")
    assert_one_line_error(result, "pre-train.py: error: at step")
    state = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in state.values())
    for line in checkpoint.with_suffix(".metrics.jsonl").read_text().splitlines():
        strict_json(line)


@pytest.mark.slow
def test_instruction_tuning_with_a_huge_alpha_stops_and_keeps_no_diverged_adapter(tmp_path):
    base = save_pretrained_checkpoint(tiny_model(vocabulary_size=50257, eos_index=50256), tmp_path / "base.pt", 32)
    records = [{"instruction": f"Say {word}.", "input": "", "output": f"{word}."} for word in "abcdefgh"]
    (tmp_path / "data.json").write_text(json.dumps(records))
    adapter = tmp_path / "adapter.pt"
    result = run_script("instruction-tune.py", "--base_model_path", base, "--dataset", "local", "--dataset_path",
                        tmp_path / "data.json", "--checkpoint_path", adapter, "--alpha", "1e30", "--batch_size", "2",
                        "--gradient_accumulation_steps", "1", "--num_epochs", "6", "--device", "cpu",
                        "--no-tensorboard")
    assert_one_line_error(result, "instruction-tune.py: error: at step")
    if adapter.exists():
        lora = torch.load(adapter, weights_only=True)["lora"]
        assert all(torch.isfinite(tensor).all() for tensor in lora.values())
