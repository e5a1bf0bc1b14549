"""Training on several processes: torchrun, the process group, collectives, wrapping a model for data
parallelism (DDP, FSDP2) and gathering or scattering its state."""

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import TypeVar

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
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from devices import autocast
from model import LightGPT

# How long a rank waits in a collective for the others, in seconds. While training: short enough that a rank
# that died takes the job down in minutes instead of leaving the others waiting forever. At start-up (while a
# node's first process downloads and tokenizes the corpus, rank 0 reads a checkpoint, and each rank compiles
# its first step) and while a checkpoint is written: long enough for one rank's slow work. The environment
# variables let a test, or a job on slow storage, change them.
TIMEOUTS = {"LIGHTGPT_PG_TIMEOUT_S": 300, "LIGHTGPT_STARTUP_TIMEOUT_S": 6 * 3600}
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

Value = TypeVar("Value")


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """This process's rank as torchrun numbers it, known before any process group exists (0 when alone)."""
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


def check_launch(device: str) -> None:
    """Raise a one-line ValueError when torchrun asks for a device that has no process-group backend, or the
    environment for a timeout that is not a number of seconds."""
    if launched_by_torchrun() and torch.device(device).type not in ("cuda", "cpu"):
        raise ValueError(f"--device: {device!r} cannot train under torchrun; use cuda (nccl) or cpu (gloo)")
    for variable in TIMEOUTS:
        timeout(variable)


def timeout(variable: str) -> timedelta:
    """The timeout that the environment variable sets (see TIMEOUTS), else its default."""
    text = os.environ.get(variable, str(TIMEOUTS[variable]))
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{variable}: must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


@contextmanager
def distributed(device_name: str) -> Iterator[torch.device]:
    """This process's device; under torchrun also a process group, pinned to this rank's GPU, that is destroyed
    however the block ends (normally, by an error or after a signal)."""
    device = torch.device(device_name)
    if not launched_by_torchrun():
        yield device
        return
    stop_with_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout("LIGHTGPT_STARTUP_TIMEOUT_S"), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout("LIGHTGPT_STARTUP_TIMEOUT_S"))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def end_start_up() -> None:
    """Once every rank is here (after its first step, compiled), collectives wait only the training timeout."""
    if dist.is_initialized():
        dist.barrier()
        dist.group.WORLD.set_timeout(timeout("LIGHTGPT_PG_TIMEOUT_S"))


@contextmanager
def slow_work_on_one_rank() -> Iterator[None]:
    """For work that takes one rank far longer than the others, such as rank 0 writing a checkpoint: collectives
    within may wait as long as at start-up, and the block ends with every rank in step again."""
    if not dist.is_initialized():
        yield
        return
    dist.group.WORLD.set_timeout(timeout("LIGHTGPT_STARTUP_TIMEOUT_S"))
    try:
        yield
        dist.barrier()
    finally:
        dist.group.WORLD.set_timeout(timeout("LIGHTGPT_PG_TIMEOUT_S"))


def stop_with_launcher() -> None:
    """On Linux, have the kernel send this rank SIGTERM when the torchrun agent that started it dies (kill -9,
    the out-of-memory killer), so that no rank trains on alone: SIGTERM stops the ranks together after a step,
    with a checkpoint, as when the agent passes a signal on."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # the agent died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)


def exit_rank() -> None:
    """Under torchrun, end this rank at once, once its work is saved and its process group destroyed: gloo's
    worker threads free a finished collective's tensors a moment late, and doing so during the interpreter's
    shutdown can abort the process (see docs/design.md)."""
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def processes_on_this_machine() -> int:
    """How many ranks torchrun started on this machine (1 when alone): they share its memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_across_ranks(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over every rank, in place (itself when training alone)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def values_of_every_rank(value: Value) -> list[Value]:
    """Every rank's value of a small picklable object, in rank order, on every rank ([value] when alone)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def first_error_of_any_rank(error: str | None) -> str | None:
    """The first rank's error message, on every rank, so that all ranks stop together rather than wait forever
    on one that left."""
    return next((message for message in values_of_every_rank(error) if message), None)


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
    return [(micro_batches[index], weight) for index, weight in micro_batch_indices_of_this_rank(len(micro_batches))]


def micro_batch_indices_of_this_rank(count: int) -> Iterator[tuple[int, float]]:
    """micro_batches_of_this_rank for `count` micro-batches, by index, one at a time: for as many as an evaluation
    of --eval_samples 1000000000 has, which no list holds."""
    num_ranks = world_size()
    weight = num_ranks / count
    for index in range(rank(), -(-count // num_ranks) * num_ranks, num_ranks):
        yield (index, weight) if index < count else (0, 0.0)


def autocast_unless_sharded(model: Module, device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """The autocast to train `model` under: none for FSDP2, whose own policy already computes in dtype."""
    return nullcontext() if isinstance(model, FSDPModule) else autocast(device, dtype)


def parallelize(
    model: LightGPT, device: torch.device, activation_checkpointing: bool, compile: bool, sharding_level: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Module:
    """Wrap a pure model for training in torchtitan's order: activation checkpointing, then compile each block,
    then, under torchrun, data parallelism: DDP at sharding level 0, FSDP2 at levels 2 and 3. FSDP2 shards each
    block on its own and leaves the tied embedding/output weight and the final norm to the root. A model built on
    the meta device is allocated on `device` and initialised only after it is sharded (see materialize)."""
    model.enable_activation_checkpointing(activation_checkpointing)
    if compile:
        for block in model.blocks:
            block.compile()  # in place: the state-dict keys stay the same however the model runs
    sharded = dist.is_initialized() and sharding_level != 0
    if sharded:
        policy = MixedPrecisionPolicy()
        if dtype != torch.float32:  # parameters gathered and computed with in dtype, gradients reduced in float32
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=sharding_level == 3, mp_policy=policy)
        fully_shard(model, reshard_after_forward=sharding_level == 3, mp_policy=policy)
    if next(model.parameters()).is_meta:
        materialize(model, device)
    if dist.is_initialized() and not sharded:
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


@torch.no_grad()
def materialize(model: LightGPT, device: torch.device) -> None:
    """Allocate a model built on the meta device on `device` (under FSDP2, only this rank's shards) and draw its
    weights as one process does: each parameter whole, one at a time and in model order, of which a rank keeps
    its shard. No rank ever holds the whole model, and the same seed gives the same weights at any number of
    processes."""
    model.to_empty(device=device)
    for name, parameter in model.named_parameters():
        if not isinstance(parameter, DTensor):
            model.init_parameter(name, parameter)
            continue
        whole = torch.empty(parameter.shape, dtype=parameter.dtype, device=device)
        model.init_parameter(name, whole)
        parameter.copy_(distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None))


# With several micro-batches per step, whether each one's gradients are reduced (reduce-scattered) across ranks
# at once, or kept whole and accumulated locally until the last one. Level 3 reduces every micro-batch, as
# torchtitan does: its gradients are never whole beyond one block. Levels 0 and 2 save those collectives; at
# level 2 that costs 4 bytes a parameter, as it already holds the whole parameters for a pass (measured in
# docs/performance.md; sizing.py models the same choice).
REDUCE_EVERY_MICRO_BATCH = {0: False, 2: False, 3: True}


def gradient_sync(model: Module, enabled: bool) -> AbstractContextManager:
    """A context for one backward pass that synchronises gradients across ranks only when `enabled`: otherwise
    they accumulate locally, whole, with no communication."""
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
    """Load a full_training_state that only rank 0 has read, sharding or replicating it onto every rank. A
    checkpoint with no optimizer state leaves the optimizer as it is."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(unwrapped(model), checkpoint["model"] if checkpoint else {}, options=options)
    if from_rank_zero(bool(checkpoint and checkpoint.get("optimizer"))):
        set_optimizer_state_dict(unwrapped(model), optimizer, checkpoint["optimizer"] if checkpoint else {},
                                 options=options)


def sharded_training_state(model: Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This rank's shards of the model and optimizer state (the whole state alone or under DDP), named as in
    full_training_state. All ranks call it; the tensors are the model's and the optimizer's own, so filling them
    in place (torch.distributed.checkpoint's load) loads them."""
    return get_model_state_dict(unwrapped(model)), get_optimizer_state_dict(unwrapped(model), optimizer)


def load_sharded_training_state(model: Module, optimizer: torch.optim.Optimizer, model_state: dict,
                                optimizer_state: dict) -> None:
    """Load the states that sharded_training_state gave, once read from a checkpoint, on every rank."""
    set_model_state_dict(unwrapped(model), model_state)
    set_optimizer_state_dict(unwrapped(model), optimizer, optimizer_state)


@contextmanager
def whole_model(model: Module) -> Iterator[Module]:
    """The LightGPT inside a training wrapper, to call other methods than forward on: under FSDP2 with its root's
    parameters (the embedding, the final norm) gathered until the block ends; each sharded block gathers its own as
    it runs, so every rank must run as many passes."""
    if not isinstance(model, FSDPModule):
        yield unwrapped(model)
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def unwrapped(model: Module) -> Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def local_part(tensor: Tensor) -> Tensor:
    """This rank's part of a tensor: a DTensor's own shard, a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def replicated(tensor: Tensor) -> Tensor:
    """A DTensor made whole on every rank (DTensor communicates); a plain tensor as it is."""
    if isinstance(tensor, DTensor):
        return tensor.redistribute(tensor.device_mesh, [Replicate()] * tensor.device_mesh.ndim)
    return tensor


def as_float(tensor: Tensor) -> float:
    """The number that a one-element tensor holds; a DTensor's is gathered from its shards first."""
    return tensor.full_tensor().item() if isinstance(tensor, DTensor) else tensor.item()
