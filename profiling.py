"""Measuring time and memory: the seconds of interleaved runs, a training step's peak memory on any device (a
tensor-counting dispatch mode where the allocator keeps no statistics), and a process's peak resident memory.
bench.py measures with them; the tests assert memory with them."""

import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux


class PeakTensorMemory(TorchDispatchMode):
    """The peak bytes of tensor storage alive at once, for devices whose allocator keeps no statistics, and the
    largest single storage.

    Every operator's outputs are counted when made and uncounted when their storage is freed; memory that
    kernels allocate internally and never return as a tensor is not seen, nor a storage resized in place (FSDP2
    frees and refills its gathered parameters so): held() says what the storages seen hold at the moment.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = self.largest = 0
        self.seen: weakref.WeakValueDictionary[int, torch.UntypedStorage] = weakref.WeakValueDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        for output in tree_leaves(outputs):
            if isinstance(output, torch.Tensor):
                self.count(getattr(output, "_local_tensor", output).untyped_storage())  # a DTensor's own shard
        return outputs

    def count(self, storage: torch.UntypedStorage) -> None:
        if id(storage) in self.seen or storage.nbytes() == 0 or storage.device.type == "meta":  # meta holds nothing
            return
        self.seen[id(storage)] = storage
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self.largest = max(self.largest, storage.nbytes())
        weakref.finalize(storage, self.release, id(storage), storage.nbytes())

    def release(self, key: int, nbytes: int) -> None:
        self.current -= nbytes

    def held(self) -> int:
        """The bytes that the storages seen and still alive hold now."""
        return sum(storage.nbytes() for storage in list(self.seen.values()))


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    tensors = [getattr(tensor, "_local_tensor", tensor) for tensor in tensors]  # a DTensor's own shard
    return sum(tensor.untyped_storage().nbytes() for tensor in {id(t): t for t in tensors}.values())


def peak_step_bytes(step: Callable[[], None], model, optimizer, device: torch.device) -> int:
    """Peak memory of one training step: the weights, the optimizer state and all that the step allocates."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return resident_bytes(model, optimizer) + torch.cuda.max_memory_allocated() - before
    with PeakTensorMemory() as tracker:
        step()
    return resident_bytes(model, optimizer) + tracker.peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(run: Callable, device) -> tuple:
    """What run() returns (a generation run: the tokens it produced) and the seconds it took."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start


def interleaved_seconds(runs: dict[str, Callable], steps: int, warmup: int, device, description: str) -> dict:
    """The median seconds of each run, the runs taking turns (in alternating order) so noise hits all alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds = {name: [] for name in runs}
    for step in tqdm(range(steps), desc=description, unit="step", file=sys.stderr):
        for name in list(runs)[:: 1 if step % 2 == 0 else -1]:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def kept_between_micro_batches(step: Callable[[], None], model: torch.nn.Module) -> int:
    """The tensor bytes that a step keeps from its first micro-batch to its last: the gradients accumulating."""
    held = []
    with PeakTensorMemory() as memory:
        hook = model.register_forward_pre_hook(lambda *_: held.append(memory.held()))
        step()
        hook.remove()
    return held[-1] - held[0]


def peak_resident_bytes() -> int:
    """This process's peak resident memory. On Linux ru_maxrss carries a parent's peak over into a new program
    (a spawned process starts at the bench's), so read the process's own high-water mark, VmHWM, instead."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT
