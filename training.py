"""What pre-training and instruction tuning share: devices, precision, wrapping, checkpoints, signals."""

import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn import Module

from model import LightGPT, best_device


def autocast(device: torch.device, mixed_precision: bool):
    """bf16 autocast on CUDA devices that support it; full precision elsewhere."""
    if mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def parallelize(model: LightGPT, activation_checkpointing: bool, compile: bool) -> Module:
    """Wrap a pure model for training, in torchtitan's order: checkpointing, then compile."""
    model.enable_activation_checkpointing(activation_checkpointing)
    if compile:
        return torch.compile(model)
    return model


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


def optimizer_step(
    model: Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    learning_rate: float,
    max_gradient_norm: float,
    padding_index: int,
    precision,
) -> tuple[float, float]:
    """One optimizer step over accumulated micro-batches; returns the step's loss and gradient norm.

    Each micro-batch's mean loss is weighted by its share of the step's targets (those that are not
    padding_index), so k batches of b samples give exactly the gradient of one batch of k x b. A loss that is
    not finite raises FloatingPointError before the weights change.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    device = next(model.parameters()).device
    num_targets = sum(int((y != padding_index).sum()) for _, y in micro_batches)
    step_loss = torch.zeros((), device=device)
    for x, y in micro_batches:
        with precision:
            _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        weighted = loss * (int((y != padding_index).sum()) / num_targets)
        weighted.backward()
        step_loss += weighted.detach()
    loss = step_loss.item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"the loss became {loss}; training stopped (try a lower --learning_rate or a lower --max_gradient_norm)"
        )
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    gradient_norm = torch.nn.utils.clip_grad_norm_(parameters, max_gradient_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, gradient_norm


@torch.no_grad()
def evaluate(model: Module, batches: list[tuple[torch.Tensor, torch.Tensor]], padding_index: int, precision) -> float:
    """Mean cross entropy per target (padding excluded) over fixed held-out batches."""
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    for x, y in batches:
        with precision:
            _, loss = model(x.to(device), y.to(device))
        num_targets = int((y != padding_index).sum())
        total += loss.float() * num_targets
        count += num_targets
    model.train()
    return total.item() / count


class EpochLog:
    """Each step's loss on the progress bar; each epoch's means, throughput and validation figures printed and
    appended to the metrics file."""

    def __init__(self, progress, metrics_path: str | Path):
        self.progress = progress
        self.metrics_path = Path(metrics_path)
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
                        help="Compile the model with torch.compile (default: on for CUDA, off elsewhere).")
    parser.add_argument("--mixed_precision", action=argparse.BooleanOptionalAction, default=True,
                        help="Use bf16 autocast on CUDA devices that support it.")
    parser.add_argument("--device", default=best_device(),
                        help="The device to run on: cuda, mps or cpu (default: the best one available).")
    parser.add_argument("--seed", type=int, default=None,
                        help="The seed for the random number generators (default: a random one, recorded).")
