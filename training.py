"""What pre-training and instruction tuning share: devices, precision, wrapping, checkpoints, signals."""

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from model import LightGPT, best_device

# Long enough for rank 0 to write a large checkpoint while the others wait; short enough that a rank that
# died takes the job down in minutes instead of leaving the others waiting forever.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=5)

Value = TypeVar("Value")


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """This process's rank as torchrun numbers it, known before any process group exists (0 when alone)."""
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that under torchrun only rank 0 prints a usage error: every rank meets it."""

    def error(self, message: str) -> NoReturn:
        if launch_rank() == 0:
            super().error(message)
        sys.exit(2)


def check_launch(device: str) -> None:
    """Raise a one-line ValueError when torchrun asks for a device that has no process-group backend."""
    if launched_by_torchrun() and torch.device(device).type not in ("cuda", "cpu"):
        raise ValueError(f"--device: {device!r} cannot train under torchrun; use cuda (nccl) or cpu (gloo)")


@contextmanager
def distributed(device_name: str) -> Iterator[torch.device]:
    """This process's device; under torchrun also a process group, pinned to this rank's GPU, that is destroyed
    however the block ends (normally, by an error or after a signal)."""
    device = torch.device(device_name)
    if not launched_by_torchrun():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def exit_rank() -> None:
    """Under torchrun, end this rank at once, once its work is saved and its process group destroyed.

    Gloo's worker threads drop their last references to a finished collective's tensors a moment after it
    completes. When that moment falls in the interpreter's shutdown, taking the GIL to free them aborts the
    process ("terminate called without an active exception"): 4 runs in 181 of a two-process CPU run did so
    here. Leaving without the interpreter's teardown leaves nothing for them to race with."""
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_across_ranks(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over every rank, in place (itself when training alone)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def every_rank_s(value: Value) -> list[Value]:
    """Every rank's value of a small picklable object, in rank order, on every rank ([value] when alone)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def first_error_of_any_rank(error: str | None) -> str | None:
    """The first rank's error message, on every rank, so that all ranks stop together rather than wait forever
    on one that left."""
    return next((message for message in every_rank_s(error) if message), None)


def from_rank_zero(value: Value) -> Value:
    """Rank 0's value of a small picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def micro_batches_of_this_rank(starts: Tensor, batch_size: int) -> list[tuple[Tensor, float]]:
    """This rank's share of the window starts of one step, as (micro-batch, loss weight) pairs. Rank r takes
    micro-batches r, r + world size, ...; every rank runs the same number of passes (a rank short of real
    micro-batches repeats one with weight 0), and the weights make the ranks' averaged gradients equal the
    gradient of the mean loss over all the micro-batches, as one process computes it."""
    micro_batches = starts.split(batch_size)
    num_ranks = world_size()
    passes = -(-len(micro_batches) // num_ranks)
    mine = micro_batches[rank()::num_ranks]
    weight = num_ranks / len(micro_batches)
    return [(mine[index], weight) if index < len(mine) else (micro_batches[0], 0.0) for index in range(passes)]


def autocast(device: torch.device, mixed_precision: bool):
    """bf16 autocast on CUDA devices that support it; full precision elsewhere."""
    if mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def precision(model: Module, device: torch.device, mixed_precision: bool) -> AbstractContextManager:
    """The autocast to train `model` under: none for FSDP2, whose own policy already computes in bf16."""
    return nullcontext() if isinstance(model, FSDPModule) else autocast(device, mixed_precision)


def parallelize(
    model: LightGPT, activation_checkpointing: bool, compile: bool, sharding_level: int = 2,
    mixed_precision: bool = False,
) -> Module:
    """Wrap a pure model for training in torchtitan's order: activation checkpointing, then compile each block,
    then, under torchrun, data parallelism: DDP at sharding level 0, FSDP2 at levels 2 and 3. FSDP2 shards each
    block on its own and leaves the tied embedding/output weight and the final norm to the root."""
    model.enable_activation_checkpointing(activation_checkpointing)
    if compile:
        for index, block in enumerate(model.body):
            model.body.register_module(str(index), torch.compile(block))
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    if sharding_level == 0:
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    policy = MixedPrecisionPolicy()
    if mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported():
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.body:
        fully_shard(block, reshard_after_forward=sharding_level == 3, mp_policy=policy)
    return fully_shard(model, reshard_after_forward=sharding_level == 3, mp_policy=policy)


def gradient_sync(model: Module, enabled: bool) -> AbstractContextManager:
    """A context for one backward pass that synchronises gradients across ranks only when `enabled`: the
    micro-steps before the optimizer step accumulate locally, with no communication."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def full_training_state(model: Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state, unsharded and on the CPU, in the same plain, parameter-named form
    whatever the world size or wrapper (all ranks must call it; only rank 0 gets the tensors)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(unwrapped(model), options=options),
        get_optimizer_state_dict(unwrapped(model), optimizer, options=options),
    )


def load_training_state(model: Module, optimizer: torch.optim.Optimizer, checkpoint: dict | None) -> None:
    """Load a full_training_state that only rank 0 has read, sharding or replicating it onto every rank."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(unwrapped(model), checkpoint["model"] if checkpoint else {}, options=options)
    set_optimizer_state_dict(unwrapped(model), optimizer, checkpoint["optimizer"] if checkpoint else {},
                             options=options)


def unwrapped(model: Module) -> Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def replicated(tensor: Tensor) -> Tensor:
    """A DTensor made whole on every rank (DTensor communicates); a plain tensor as it is."""
    if isinstance(tensor, DTensor):
        return tensor.redistribute(tensor.device_mesh, [Replicate()] * tensor.device_mesh.ndim)
    return tensor


def item(tensor: Tensor) -> float:
    return tensor.full_tensor().item() if isinstance(tensor, DTensor) else tensor.item()


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor, same hyperparameters and state, with a step that also runs on FSDP2's sharded
    DTensor parameters: the factored second moments average whole columns, which span the shards, and
    PyTorch's in-place kernels cannot ask DTensor for that sum; these out-of-place operations can."""

    @torch.no_grad()
    def step(self, closure=None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._update(parameter, group)
        return loss

    def _update(self, parameter: Tensor, group: dict) -> None:
        gradient = -parameter.grad if group["maximize"] else parameter.grad
        learning_rate = float(group["lr"])
        smallest_variance, smallest_scale = group["eps"]
        if smallest_variance is None:
            smallest_variance = torch.finfo(parameter.dtype).eps
        state = self.state[parameter]
        if not state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        step = state["step"].item()
        decay = step ** group["beta2_decay"]
        relative_step = min(learning_rate, 1 / step**0.5)
        scale = max(smallest_scale, item(parameter.norm()) / parameter.numel() ** 0.5) * relative_step
        if group["weight_decay"]:
            parameter.mul_(1 - learning_rate * group["weight_decay"])
        if gradient.dim() > 1:
            row_mean = gradient.norm(dim=-1, keepdim=True).square() / gradient.size(-1)
            column_mean = replicated(gradient.norm(dim=-2, keepdim=True)).square() / gradient.size(-2)
            if "row_var" not in state:
                state["row_var"], state["col_var"] = torch.zeros_like(row_mean), torch.zeros_like(column_mean)
            state["row_var"].lerp_(row_mean, decay)
            state["col_var"].lerp_(column_mean, decay)
            row_scale = replicated(state["row_var"].mean(dim=-2, keepdim=True)).clamp(min=smallest_variance)
            variance = state["row_var"] @ state["col_var"] / row_scale
        else:
            if "variance" not in state:
                state["variance"] = torch.zeros_like(gradient)
            state["variance"].lerp_(gradient * gradient, decay)
            variance = state["variance"]
        update = variance.clamp(min=smallest_variance**2).rsqrt() * gradient
        clipping = max(1.0, item(update.norm()) / (update.numel() ** 0.5 * group["d"]))
        parameter.add_(update, alpha=-scale / clipping)


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup to the peak, then cosine decay to a tenth of it by the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def save_atomically(checkpoint: dict, path: str | Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def append_metrics(path: str | Path, record: dict) -> None:
    """One JSON object per line, so a run's curves can be plotted while it trains."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


class GracefulExit:
    """Turns SIGINT and SIGTERM into a flag the training loop checks after each step."""

    def __init__(self):
        self.requested = False
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, self._request)

    def _request(self, signal_number: int, frame) -> None:
        self.requested = True


def weighted_by_targets(batches: list[tuple[Tensor, Tensor]], padding_index: int) -> list[tuple[Tensor, Tensor, float]]:
    """Each micro-batch with its share of the step's targets that are not padding_index as its loss weight, so
    k padded batches of b samples give exactly the gradient of one batch of k x b."""
    counts = [int((targets != padding_index).sum()) for _, targets in batches]
    return [(inputs, targets, count / sum(counts)) for (inputs, targets), count in zip(batches, counts)]


def optimizer_step(
    model: Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, Tensor, float]],
    learning_rate: float,
    max_gradient_norm: float,
    precision: AbstractContextManager,
    stop_requested: bool = False,
) -> tuple[float, float, bool]:
    """One optimizer step over this rank's accumulated micro-batches, each (inputs, targets, loss weight).

    The weights make the ranks' averaged gradients the gradient of the step's mean loss; the gradients are
    synchronised once, after the last micro-batch. Returns the step's loss, the gradient norm, and whether any
    rank asked to stop (one reduction carries the loss and the requests, so every rank stops at the same step).
    A loss that is not finite raises FloatingPointError on every rank before the weights change.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    device = next(model.parameters()).device
    step_loss = torch.zeros((), device=device)
    for index, (inputs, targets, weight) in enumerate(micro_batches):
        with gradient_sync(model, index == len(micro_batches) - 1):
            with precision:
                _, loss = model(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
            (loss * weight).backward()
        step_loss += loss.detach() * weight
    step_loss, stop_requests = sum_across_ranks(
        torch.stack([step_loss, torch.tensor(float(stop_requested), device=device)])
    ).tolist()
    step_loss /= world_size()
    if not math.isfinite(step_loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"the loss became {step_loss}; training stopped (try a lower --learning_rate or a lower "
            f"--max_gradient_norm)"
        )
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    gradient_norm = item(torch.nn.utils.clip_grad_norm_(parameters, max_gradient_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, gradient_norm, stop_requests > 0


@torch.no_grad()
def evaluate(model: Module, batches: list[tuple[Tensor, Tensor, float]], padding_index: int,
             precision: AbstractContextManager) -> float:
    """Mean cross entropy per target (padding excluded) over fixed held-out batches, each rank evaluating its
    share; a batch of weight 0 is a pass that only keeps the ranks in step, and counts nothing."""
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for inputs, targets, weight in batches:
        with precision:
            _, loss = model(inputs.to(device), targets.to(device))
        if weight:
            num_targets = (targets != padding_index).sum().to(device)
            total += loss.float() * num_targets
            count += num_targets
    model.train()
    total, count = sum_across_ranks(torch.stack([total, count])).tolist()
    return total / count


class EpochLog:
    """Each step's loss on the progress bar; each epoch's means, throughput and validation figures printed and
    appended to the metrics file."""

    def __init__(self, progress, metrics_path: str | Path | None):
        """metrics_path None: this process keeps count but reports nothing (the other ranks under torchrun)."""
        self.progress = progress
        self.metrics_path = Path(metrics_path) if metrics_path else None
        if self.metrics_path:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.losses, self.gradient_norms, self.start = [], [], time.perf_counter()

    def add_step(self, loss: float, gradient_norm: float, learning_rate: float) -> None:
        self.progress.update()
        self.progress.set_postfix(loss=f"{loss:.3f}", lr=f"{learning_rate:.2e}")
        self.losses.append(loss)
        self.gradient_norms.append(gradient_norm)
        self.learning_rate = learning_rate

    def end_epoch(self, epoch: int, step: int, unit: str, units: int, validation_loss: float | None) -> None:
        """Log the epoch that just ended; `units` of `unit` (tokens, samples) were trained on in it."""
        record = {
            "epoch": epoch,
            "step": step,
            "loss": sum(self.losses) / len(self.losses),
            "gradient_norm": sum(self.gradient_norms) / len(self.gradient_norms),
            "learning_rate": self.learning_rate,
            f"{unit}_per_second": units / (time.perf_counter() - self.start),
        }
        if validation_loss is not None:
            record |= {"validation_loss": validation_loss, "validation_perplexity": math.exp(validation_loss)}
        if self.metrics_path:
            self.progress.write(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                         for key, value in record.items()))
            append_metrics(self.metrics_path, record)
        self._start_epoch()


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of how a training run uses its device, the same in pre-training and instruction tuning."""
    parser.add_argument("--max_gradient_norm", type=float, default=1.0,
                        help="Clip gradients above this global norm before stepping.")
    parser.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="Recompute each block's activations during the backward pass to save memory.")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="Compile each block with torch.compile (default: on for CUDA, off elsewhere).")
    parser.add_argument("--mixed_precision", action=argparse.BooleanOptionalAction, default=True,
                        help="Compute in bf16 on CUDA devices that support it (autocast; FSDP2's bf16 parameters at "
                        "sharding levels 2 and 3).")
    parser.add_argument("--device", default=best_device(),
                        help="The device to run on: cuda, mps or cpu (default: the best one available).")
    parser.add_argument("--seed", type=int, default=None,
                        help="The seed for the random number generators (default: a random one, recorded).")
