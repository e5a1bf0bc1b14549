"""The training loop that pre-training and instruction tuning share: its RunConfig, schedule, optimizer step,
evaluation, logging, random-number state and stopping on a signal."""

import math
import signal
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor
from torch.nn import Module
from tqdm import tqdm

from checkpoint import metrics_path
from devices import peak_tflops
from distributed import (
    as_float,
    autocast_unless_sharded,
    end_start_up,
    first_error_of_any_rank,
    gradient_sync,
    local_part,
    rank,
    slow_work_on_one_rank,
    sum_across_ranks,
    unwrapped,
    world_size,
)
from preparation import DamagedCorpus
from run_log import EpochLog, records_up_to, tensorboard_writer

# A run whose gradient norm is NaN or infinite this many steps in a row (each step skipped) has diverged, and stops.
NON_FINITE_STEPS_TO_STOP = 3


def warmup_steps_of(warmup: int | float, total_steps: int) -> int:
    """--warmup_steps as steps: a number of steps as given, or a fraction of the run's steps (from a percentage),
    so that a short run warms up in proportion, and still reaches its peak learning rate."""
    return warmup if isinstance(warmup, int) else round(warmup * total_steps)


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup to the peak, then cosine decay to a tenth of it by the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def rng_state(device: torch.device) -> dict:
    """This process's random-number state: the CPU's and, on a GPU, its own GPU's. Not every visible GPU's:
    a run resumed on fewer GPUs could not restore them all."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    own = saved_device_state(state, device)
    if own is not None:
        torch.cuda.set_rng_state(own, device)


def saved_device_state(state: dict, device: torch.device) -> Tensor | None:
    """The saved generator state of this process's GPU, if it has one. Older checkpoints kept a list of every
    visible GPU's state, in which this process's is the one at its device's index."""
    saved = state.get("cuda")
    if device.type != "cuda" or saved is None:
        return None
    if isinstance(saved, Tensor):
        return saved
    index = device.index if device.index is not None else torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def restore_scaler(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Continue with the loss scale a checkpoint saved; one written under another precision, or before the
    scale was saved, has none, and the scaler starts afresh."""
    if state:
        scaler.load_state_dict(state)


def note_optimizer_starts_afresh(checkpoint_path: str | Path) -> None:
    """What resuming from a checkpoint that no training run wrote (one made by hand, or for inference) resets."""
    print(f"Note: {checkpoint_path} holds no optimizer state (a training run did not write it): the optimizer "
          f"starts afresh")


class GracefulExit:
    """Turns SIGINT and SIGTERM into a flag the training loop checks after each step, and the exit status that
    the signal calls for (128 + its number: 130, 143), so that `pre-train.py ... && next` stops there too."""

    def __init__(self):
        self.requested = False
        self.exit_status = 128 + signal.SIGTERM  # a rank that the stop reached through another rank
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, self._request)

    def _request(self, signal_number: int, frame) -> None:
        self.requested, self.exit_status = True, 128 + signal_number


def weighted_by_targets(batches: list[tuple[Tensor, Tensor]], padding_index: int) -> list[tuple[Tensor, Tensor, float]]:
    """Each micro-batch with its share of the step's targets that are not padding_index as its loss weight, so
    k padded batches of b samples give exactly the gradient of one batch of k x b."""
    counts = [int((targets != padding_index).sum()) for _, targets in batches]
    return [(inputs, targets, count / sum(counts)) for (inputs, targets), count in zip(batches, counts)]


def weighted_by_rows(batches: list[tuple[Tensor, Tensor]], padding_index: int) -> list[tuple[Tensor, Tensor, float]]:
    """Each micro-batch with its share of the step's rows as its loss weight: for a loss that averages over rows (or
    pairs of them) rather than targets. padding_index is weighted_by_targets', unused."""
    total = sum(len(inputs) for inputs, _ in batches)
    return [(inputs, targets, len(inputs) / total) for inputs, targets in batches]


# A micro-batch's loss: (mean loss, further figures, units) of (model, inputs, targets); see language_model_loss.
LossFunction = Callable[[Module, Tensor, Tensor], tuple[Tensor, dict[str, Tensor], Tensor]]


def language_model_loss(model: Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The training loss of pre-training and instruction tuning: the mean cross entropy of the targets that are not
    padding. Every loss of a RunConfig returns (the mean loss of a micro-batch, further figures as means over the
    same units, how many units (targets, pairs) those are), and calls the model as given (wrapped by DDP or FSDP2)."""
    _, loss = model(inputs, targets)
    return loss, {}, (targets != unwrapped(model).padding_index).sum()


def to_device(batch: Tensor, device: torch.device) -> Tensor:
    """A batch on the device. A GPU gets it through pinned memory, so that the copy runs while the GPU computes:
    a non-blocking copy from ordinary (pageable) memory waits until it is done."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def optimizer_step(
    model: Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, Tensor, float]],
    learning_rate: float,
    max_gradient_norm: float,
    precision: AbstractContextManager,
    scaler: torch.amp.GradScaler,
    stop_requested: bool = False,
    reduce_every_micro_batch: bool = False,
    loss_of: LossFunction = language_model_loss,
) -> tuple[float, float, bool, dict[str, float]]:
    """One optimizer step over this rank's accumulated micro-batches, each (inputs, targets, loss weight).

    The weights make the ranks' averaged gradients the gradient of the step's mean loss; the gradients are
    synchronised once, after the last micro-batch, or after every one (see REDUCE_EVERY_MICRO_BATCH). Returns
    the step's loss (loss_of's, language_model_loss by default), the gradient norm, whether any rank asked to stop
    (one reduction carries the loss, its figures and the requests, so every rank stops at the same step) and the
    step's means of loss_of's further figures. A loss that is not finite raises FloatingPointError on every rank
    before the weights change; a step whose gradient norm is not finite is skipped, the weights left as they are
    (the caller stops a run that keeps doing it). Under fp16 the scaler multiplies the loss before the backward
    pass and divides the gradients before they are clipped; it skips a step whose gradients overflowed, and lowers
    its scale.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    device = next(model.parameters()).device
    step_loss, figures = torch.zeros((), device=device), {}
    for index, (inputs, targets, weight) in enumerate(micro_batches):
        with gradient_sync(model, reduce_every_micro_batch or index == len(micro_batches) - 1):
            with precision:
                loss, batch_figures, _ = loss_of(model, to_device(inputs, device), to_device(targets, device))
            scaler.scale(loss * weight).backward()
        step_loss += loss.detach() * weight
        for name, value in batch_figures.items():
            figures[name] = figures.get(name, 0) + value.detach().float() * weight
    step_loss, stop_requests, *figure_values = sum_across_ranks(
        torch.stack([step_loss, torch.tensor(float(stop_requested), device=device), *figures.values()])
    ).tolist()
    step_loss /= world_size()
    figures = {name: value / world_size() for name, value in zip(figures, figure_values)}
    if not math.isfinite(step_loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"the loss became {step_loss}; training stopped (try a lower --learning_rate or a lower "
            f"--max_gradient_norm)"
        )
    scaler.unscale_(optimizer)
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    gradient_norm = as_float(torch.nn.utils.clip_grad_norm_(parameters, max_gradient_norm))
    if math.isfinite(gradient_norm) or scaler.is_enabled():  # fp16's scaler skips such a step itself
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, gradient_norm, stop_requests > 0, figures


@torch.no_grad()
def evaluate(model: Module, batches: Iterable[tuple[Tensor, Tensor, float]], precision: AbstractContextManager,
             loss_of: LossFunction = language_model_loss) -> tuple[float, dict[str, float]]:
    """The mean loss (loss_of's, by default the cross entropy per target, padding excluded) and its further figures
    over fixed held-out batches, each rank evaluating its share; a batch of weight 0 is a pass that only keeps the
    ranks in step, and counts nothing."""
    model.eval()
    device = next(model.parameters()).device
    totals, count = {}, torch.zeros((), device=device)  # the loss and each figure, times its units
    for inputs, targets, weight in batches:
        with precision:
            loss, figures, units = loss_of(model, to_device(inputs, device), to_device(targets, device))
        units = units if weight else torch.zeros_like(units)
        for name, value in ({"loss": loss} | figures).items():  # every rank reduces the same names
            totals[name] = totals.get(name, 0) + (value.float() * units if weight else torch.zeros((), device=device))
        count += units
    model.train()
    count, *values = sum_across_ranks(torch.stack([count, *totals.values()])).tolist()
    means = {name: value / count for name, value in zip(totals, values)}
    return means.pop("loss"), means


@dataclass(frozen=True)
class RunConfig:
    """What a training run is asked to do, read from its flags (flags.run_config): its schedule, how often it
    evaluates and saves, where it writes, and the words in which it reports."""

    num_epochs: int
    steps_per_epoch: int
    learning_rate: float  # the peak, reached after the warmup
    warmup_steps: int | float  # steps, or a fraction of all the steps (warmup_steps_of)
    max_gradient_norm: float
    eval_interval: int  # in epochs, and always at the end
    checkpoint_interval: int  # in epochs, and always at the end
    checkpoint_path: str | Path
    log_dir: str | Path | None  # TensorBoard's folder; None: runs/ beside the checkpoint
    tensorboard: bool
    unit: str  # what units_per_epoch counts: tokens, samples
    units_per_epoch: int
    description: str  # the progress bar's label
    saved_what: str  # what the checkpoint holds, in the closing line: checkpoint, adapters
    program: str  # the script's name, which error lines start with
    dtype: torch.dtype = torch.float32  # the forward passes compute in it (autocast, or FSDP2's own policy)
    flops_per_unit: float | None = None  # the FLOPs of training on one unit, for the model FLOPs utilization
    reduce_every_micro_batch: bool = False  # see distributed.REDUCE_EVERY_MICRO_BATCH
    # a micro-batch's loss, its further figures and its units (language_model_loss says more)
    loss_of: LossFunction = language_model_loss
    flags: dict = field(default_factory=dict)  # every flag of the run, shown in TensorBoard

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs


def rank_zero_log(run: RunConfig, progress, start_step: int, device: torch.device) -> EpochLog:
    """Rank 0's log: the metrics file beside the checkpoint, TensorBoard unless turned off, and the model FLOPs
    utilization where the device's peak is known (the peak of all the processes' devices together)."""
    peak = peak_tflops(device, run.dtype)
    return EpochLog(progress, metrics_path(run.checkpoint_path),
                    tensorboard_writer(run, run.flags, start_step) if run.tensorboard else None,
                    run.flops_per_unit, peak and peak * 1e12 * world_size(), run.loss_of is language_model_loss)


def train(
    model: Module,
    optimizer: torch.optim.Optimizer,
    micro_batches_at: Callable[[int], list[tuple[Tensor, Tensor, float]]],
    eval_batches: Iterable[tuple[Tensor, Tensor, float]],
    save: Callable[[int, int], None],
    run: RunConfig,
    start_step: int,
    scaler: torch.amp.GradScaler,
    benchmark: Callable[[Module, AbstractContextManager, int, bool], dict[str, float] | None] | None = None,
) -> None:
    """Train from start_step to the end of run.num_epochs, on every rank.

    Args:
        model: the model to train, as parallelize wrapped it; padding targets (its padding_index) count nothing.
        optimizer: steps at the learning rate of run's schedule.
        micro_batches_at: micro_batches_at(step) gives this rank's micro-batches of a step, each (inputs, targets,
            loss weight).
        eval_batches: this rank's fixed held-out batches, in the same form.
        save: save(step, epoch) writes a checkpoint (every rank calls it).
        run: the schedule, intervals, paths and labels (RunConfig).
        start_step: the optimizer steps already done (0, or a resumed checkpoint's).
        scaler: scales an fp16 loss (a disabled scaler otherwise).
        benchmark: benchmark(model, precision, epoch, last), called on every rank at the end of each epoch, gives
            more figures to log when they are due (see EpochLog.end_epoch), or None.

    Each epoch is logged, evaluated every run.eval_interval epochs and saved every run.checkpoint_interval
    epochs, both always at the end. SIGINT or SIGTERM saves and stops every rank at the same step, exiting
    130 or 143. Rank 0 alone shows progress, writes the metrics log beside run.checkpoint_path (first dropping its
    records past start_step) and, unless run.tensorboard is off, TensorBoard curves under run.log_dir, with the
    model FLOPs utilization when run.flops_per_unit and the device's peak are known. A file that cannot be written
    stops every rank with one line. Ranks wait for each other as long as at start-up until the first step is done,
    and while a checkpoint is saved.
    """
    main_process = rank() == 0
    total_steps = run.total_steps
    if start_step >= total_steps:
        if main_process:
            print(f"Nothing left to train: {run.checkpoint_path} is at step {start_step}, and --num_epochs "
                  f"{run.num_epochs} ends at step {total_steps} ({run.steps_per_epoch} steps per epoch); to train "
                  f"further, resume with a larger --num_epochs")
        return
    warmup_steps = warmup_steps_of(run.warmup_steps, total_steps)
    step = start_step
    exit_request = GracefulExit()
    # Rank 0 writes every file; every rank stops when it could not. Before the progress bar, which a warning about
    # the metrics log would cut in two.
    failure = write_error(records_up_to, metrics_path(run.checkpoint_path), step) if main_process else None
    progress = tqdm(total=total_steps, initial=step, desc=run.description, unit="step", disable=not main_process)
    device = next(model.parameters()).device
    precision = autocast_unless_sharded(model, device, run.dtype)
    log = rank_zero_log(run, progress, start_step, device) if main_process else EpochLog(progress, None)

    def stop(error: str) -> NoReturn:
        log.close()
        sys.exit(f"{run.program}: error: {error}" if main_process else 1)

    if failure := first_error_of_any_rank(failure):
        stop(failure)

    model.train()
    non_finite_steps = 0
    while step < total_steps:
        learning_rate = learning_rate_at(step, total_steps, warmup_steps, run.learning_rate)
        try:
            step_loss, gradient_norm, stop_requested, figures = optimizer_step(
                model, optimizer, micro_batches_at(step), learning_rate, run.max_gradient_norm, precision, scaler,
                exit_request.requested, run.reduce_every_micro_batch, run.loss_of,
            )
        except FloatingPointError as error:
            stop(f"at step {step}, {error}")
        except DamagedCorpus as error:
            stop(str(error))
        non_finite_steps = 0 if math.isfinite(gradient_norm) or scaler.is_enabled() else non_finite_steps + 1
        if non_finite_steps == NON_FINITE_STEPS_TO_STOP:
            stop(f"at step {step}, the gradient norm was {gradient_norm} {non_finite_steps} steps in a row (each "
                 f"skipped); training stopped, {run.checkpoint_path} is left as it was (try a lower "
                 f"--learning_rate or a lower --max_gradient_norm)")
        step += 1
        if step == start_step + 1:
            end_start_up()
        log.add_step(step, step_loss, gradient_norm, learning_rate, figures)

        epoch, end_of_epoch = divmod(step, run.steps_per_epoch)
        failure = None
        last = step == total_steps
        if end_of_epoch == 0:
            try:
                validation_loss, validation_figures = (evaluate(model, eval_batches, precision, run.loss_of)
                                                       if epoch % run.eval_interval == 0 or last else (None, None))
            except DamagedCorpus as error:
                stop(str(error))
            benchmarks = benchmark(model, precision, epoch, last) if benchmark else None
            failure = write_error(log.end_epoch, epoch, step, run.unit, run.units_per_epoch, validation_loss,
                                  validation_figures, benchmarks)
        if stop_requested or end_of_epoch == 0 and (epoch % run.checkpoint_interval == 0 or last):
            if divergence := diverged(model, validation_loss if end_of_epoch == 0 else None):
                stop(f"at step {step}, {divergence}: the run diverged; nothing was saved, {run.checkpoint_path} is "
                     f"left as it was (try a lower --learning_rate)")
            with slow_work_on_one_rank():
                failure = write_error(save, step, epoch) or failure
        if (end_of_epoch == 0 or stop_requested) and (failure := first_error_of_any_rank(failure)):
            stop(failure)
        if stop_requested:
            log.close()
            if main_process:
                print(f"Stopped by signal at step {step}; {run.saved_what} saved to {run.checkpoint_path}", flush=True)
            sys.exit(exit_request.exit_status)
    log.close()
    if main_process:
        print(f"Done: {run.saved_what} saved to {run.checkpoint_path}")


def diverged(model: Module, validation_loss: float | None) -> str | None:
    """What shows that a model about to be saved has diverged (a validation loss or weights that are not finite
    numbers), else None; every rank calls it."""
    if validation_loss is not None and not math.isfinite(validation_loss):
        return f"the validation loss is {validation_loss}"
    return None if weights_are_finite(model) else "the weights hold NaN or infinite numbers"


def weights_are_finite(model: Module) -> bool:
    """Whether the weights of every rank (its own shards under FSDP2) are finite numbers; every rank calls it."""
    device = next(model.parameters()).device
    non_finite = torch.zeros((), device=device)
    for parameter in model.parameters():
        non_finite += local_part(parameter).detach().isfinite().logical_not().sum()
    return sum_across_ranks(non_finite).item() == 0


def write_error(write: Callable[..., None], *args) -> str | None:
    """write(*args), and the message of the OSError it raises when a file could not be written, else None."""
    try:
        write(*args)
    except OSError as error:
        return str(error)
    return None
