"""What a file must hold before anything is built from it: checksums of its tensors and shards, a model
configuration of the right types and ranges, weights of the right names, shapes and finiteness."""

import math
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import torch
import xxhash
from torch import Tensor

from model import LightGPT, LightGPTConfig, described
from tokenizer import TOKENIZER_NAME

# The entry of a checkpoint (and of an exported config.json) that holds a checksum of each tensor, by its path of
# keys, and that of a sharded checkpoint's index that holds one of each file of its folder of shards. Optional:
# older files have none.
CHECKSUMS, SHARD_CHECKSUMS = "checksums", "shard_checksums"


def tensor_checksums(entries: dict) -> dict[str, str]:
    """An xxh3 hash of the bytes of every tensor in a checkpoint's entries (in nested dictionaries and lists), by
    its path of keys: loading verifies them (verify_checksums), so flipped bytes in a file are found, not used."""
    return {name: checksum(tensor) for name, tensor in tensors_in(entries) if name != CHECKSUMS}


def tensors_in(value, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Each tensor in a value of nested dictionaries, lists and tuples, with its path of keys ("model/blocks.0...")."""
    if isinstance(value, Tensor):
        yield path, value
    elif isinstance(value, dict | list | tuple):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield from tensors_in(item, f"{path}/{key}" if path else str(key))


def checksum(tensor: Tensor) -> str:
    """The xxh3 hash of a tensor's bytes (about 6 GB/s on one CPU core)."""
    return xxhash.xxh3_64_hexdigest(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def verify_checksums(entries: dict, checksums, path: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Raise a one-line ValueError naming the first tensor whose bytes differ from the checksum saved with them
    (files written before checksums have none, and load as before); the entries named in `skip` are left to
    whoever reads them (see load_index). The names are those the file was written with, before any upgrade."""
    if not isinstance(checksums, dict):
        raise ValueError(f"{path}: its checksums entry must be a dictionary, got {described(checksums)}")
    for name, tensor in tensors_in({key: value for key, value in entries.items() if key not in skip}):
        if name in checksums and checksum(tensor) != checksums[name]:
            raise ValueError(f"{path}: {name} differs from the checksum saved with it: the file is damaged; restore "
                             f"it from a copy")


def verify_optimizer_state(checkpoint: dict, path: str | Path) -> None:
    """verify_checksums for the optimizer state of a checkpoint to resume, which loading leaves unverified."""
    if CHECKSUMS in checkpoint:
        verify_checksums({"optimizer": checkpoint.get("optimizer")}, checkpoint[CHECKSUMS], path)


def check_optimizer_state(state, optimizer: torch.optim.Optimizer, shapes: dict, path: str | Path) -> None:
    """Raise a one-line ValueError unless an optimizer state to resume is this optimizer's: the same kind (its
    parameter groups' settings), as many groups of as many parameters, each state tensor of its parameter's shape.
    shapes maps the state's parameter keys (indices or names) to the shapes of the parameters they stand for."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise ValueError(f"{path}: its optimizer state has no list of parameter groups: the checkpoint is damaged")
    ours = optimizer.param_groups
    if [len(group.get("params", ())) for group in groups] != [len(group["params"]) for group in ours]:
        raise ValueError(f"{path}: its optimizer state has parameter groups of "
                         f"{[len(group.get('params', ())) for group in groups]} parameters, this model's "
                         f"{[len(group['params']) for group in ours]}; resume with the run's own checkpoint")
    if [sorted(group) for group in groups] != [sorted(group) for group in ours]:
        differing = sorted(set().union(*groups) ^ set().union(*ours))
        raise ValueError(f"{path}: its optimizer state is another optimizer's (its settings and this run's "
                         f"{type(optimizer).__name__}'s differ in {differing}); resume with the run's own checkpoint")
    for key, values in (state.get("state") or {}).items():
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, Tensor) and value.dim() and not fits(value.shape, shapes.get(key)):
                raise ValueError(f"{path}: its optimizer state's {name} for parameter {key} has shape "
                                 f"{tuple(value.shape)}, the model's parameter "
                                 f"{tuple(shapes[key]) if key in shapes else 'does not exist'}; resume with the "
                                 f"run's own checkpoint")


def fits(shape: torch.Size, parameter_shape: torch.Size | None) -> bool:
    """Whether an optimizer's state tensor of this shape can belong to a parameter of that shape: the same, or
    with sizes of 1 where a factored state (Adafactor's row and column variances) keeps one value per row or column."""
    return parameter_shape is not None and len(shape) == len(parameter_shape) and all(
        size in (1, parameter_size) for size, parameter_size in zip(shape, parameter_shape))


def file_checksums(folder: Path) -> dict[str, str]:
    """The xxh3 hash of each file in a folder of shards, by name."""
    return {file.name: file_checksum(file) for file in sorted(folder.iterdir())}


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file_checksums(folder: Path, checksums, first: int, every: int) -> None:
    """Raise a one-line ValueError when a file of the folder (of those at first, first + every, ...) is missing
    or differs from its checksum."""
    if not isinstance(checksums, dict):
        raise ValueError(f"{folder}: its index's {SHARD_CHECKSUMS} must be a dictionary, got {described(checksums)}")
    for name in sorted(checksums)[first::every]:
        file = folder / Path(name).name  # a name, never a path out of the folder
        if not file.is_file():
            raise ValueError(f"{folder}: its shard file {file.name} is missing: the checkpoint is damaged")
        if file_checksum(file) != checksums[name]:
            raise ValueError(f"{file}: differs from the checksum saved with it: the checkpoint is damaged; restore "
                             f"it from a copy")


def checked_model(checkpoint: dict, path: str | Path) -> LightGPTConfig:
    """The configuration of a checkpoint's model, once its model_args and weights (their names, shapes and dtypes)
    are known to make a LightGPT; else a one-line ValueError."""
    config = model_config(checkpoint["model_args"], path)
    weights = checked_tensors(checkpoint["model"], path)
    check_weights(expected_shapes(config), {name: tensor.shape for name, tensor in weights.items()}, path)
    return config


def model_config(model_args, path: str | Path) -> LightGPTConfig:
    """A checkpoint's model_args (or an exported config's fields) as a LightGPTConfig, or a one-line ValueError
    that names the field, its value and its type."""
    if not isinstance(model_args, dict):
        raise ValueError(f"{path}: its model_args must be a dictionary, got a {type(model_args).__name__}")
    known = {field.name for field in fields(LightGPTConfig)}
    if unknown := sorted(map(str, model_args.keys() - known)):
        raise ValueError(f"{path}: its model_args hold {', '.join(unknown)}, which a LightGPT has not")
    try:
        return LightGPTConfig(**model_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its model_args do not make a LightGPT ({error})") from None


def expected_shapes(config: LightGPTConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every weight of a LightGPT of this configuration, from a one-layer model on the meta
    device, its layer's weights repeated for every layer: building the whole model first, even on the meta
    device, takes minutes for a configuration of 20,000 layers that its file does not hold."""
    with torch.device("meta"):
        one_layer = LightGPT(replace(config, num_layers=1))
    shapes = {}
    for name, tensor in one_layer.state_dict().items():
        layers, in_layer, rest = name.partition(".0.")
        for layer in range(config.num_layers) if in_layer else (None,):
            shapes[name if layer is None else f"{layers}.{layer}.{rest}"] = tuple(tensor.shape)
    return shapes


def checked_tensors(state, path: str | Path) -> dict[str, Tensor]:
    """A checkpoint's weights, or a one-line ValueError unless they are a dictionary of floating-point tensors."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: its weights must be a dictionary of tensors, got a {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            kind = f"a tensor of {tensor.dtype}" if isinstance(tensor, Tensor) else f"a {type(tensor).__name__}"
            raise ValueError(f"{path}: its weight {name} must be a floating-point tensor, got {kind}")
    return state


def check_weights(expected: dict[str, tuple], found: dict[str, tuple], path: str | Path) -> None:
    """Raise a one-line ValueError naming the weights that are missing, unexpected or of another shape than the
    model's: loading never re-initialises a missing weight or fails deep inside PyTorch."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [f"{name} {tuple(found[name])} instead of {expected[name]}" for name in expected
                if name in found and tuple(found[name]) != expected[name]]
    problems = [f"{what} {listed(names)}" for what, names in (("missing", missing), ("unexpected", unexpected),
                                                             ("of another shape:", reshaped)) if names]
    if problems:
        raise ValueError(f"{path}: its model_args and weights do not make a LightGPT ({'; '.join(problems)})")


def listed(names: list[str], most: int = 3) -> str:
    """The first few names, and how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def finite(model: LightGPT, path: str | Path) -> LightGPT:
    """The model, or a one-line ValueError naming the first weight that holds NaN or an infinity."""
    check_finite(model.state_dict(), path)
    return model


def check_finite(weights: dict[str, Tensor], path: str | Path) -> None:
    """Raise a one-line ValueError naming the first of the weights that holds NaN or an infinity."""
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: its weights hold NaN or infinite numbers (in {name}); the run that wrote "
                             f"it diverged, or the file is damaged")


# The entries of torch.amp.GradScaler's state, which a run under fp16 saves.
GRAD_SCALER_ENTRIES = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
GENERATOR_STATE = f"a CPU generator's state (torch.Generator().get_state(), {torch.get_rng_state().numel()} bytes)"


def check_resumable_entries(checkpoint: dict, path: str | Path) -> None:
    """Raise a one-line ValueError naming the first entry of a checkpoint to resume, besides its weights and
    optimizer state, that is not what a training run writes: its step (a whole number, at least 0), its
    sampler's and every rank's random-number states (a CPU generator's state, and on a GPU a byte tensor) and its
    loss scaler's state (GradScaler's entries, as numbers). Restoring them would otherwise fail deep inside
    PyTorch, or train on at a wrong step. (Its tokenizer is checked wherever a checkpoint is read: load_index.)"""
    step = checkpoint.get("step", 0)
    if type(step) is not int or step < 0:
        raise ValueError(f"{path}: its step must be a whole number of at least 0, got {described(step)}")
    sampler = checkpoint.get("sampler")
    if not (sampler is None or is_generator_state(sampler)):
        raise ValueError(f"{path}: its sampler must be {GENERATOR_STATE}, got {described_tensor(sampler)}")
    rng = checkpoint.get("rng", [])
    if not isinstance(rng, list | None) or not all(
            isinstance(state, dict) and is_generator_state(state.get("torch"))
            and isinstance(state.get("cuda"), Tensor | list | None) for state in rng or []):
        raise ValueError(f"{path}: its rng must be a list of each rank's random-number states, each a dictionary "
                         f"whose 'torch' entry is {GENERATOR_STATE}")
    scaler = checkpoint.get("grad_scaler", {})
    if not isinstance(scaler, dict | None) or scaler and not (scaler.keys() == GRAD_SCALER_ENTRIES and all(
            type(value) in (int, float) and math.isfinite(value) for value in scaler.values())):
        raise ValueError(f"{path}: its grad_scaler must be a GradScaler's state (numbers for "
                         f"{', '.join(sorted(GRAD_SCALER_ENTRIES))}) or empty, got {described(scaler)[:200]}")


def is_generator_state(state) -> bool:
    """Whether a CPU generator takes this state: its size is checked, and so is its content (mt19937's)."""
    try:
        torch.Generator().set_state(state)
    except (TypeError, RuntimeError):
        return False
    return True


def described_tensor(value) -> str:
    return (f"a tensor of {value.numel()} {value.dtype} that a generator refuses" if isinstance(value, Tensor)
            else described(value)[:100])


def context_length(checkpoint: dict, path: str | Path) -> int:
    """The block_size the checkpoint was trained with, or a one-line ValueError when it is not a positive
    whole number."""
    block_size = checkpoint.get("block_size")
    if type(block_size) is not int or block_size < 1:
        raise ValueError(f"{path}: its block_size must be a positive whole number, got {described(block_size)}")
    return block_size


def check_tokenizer(checkpoint: dict, path: str | Path) -> None:
    """Raise a one-line ValueError unless the checkpoint's tokenizer, when it names one, is LightGPT's."""
    tokenizer = checkpoint.get("tokenizer", TOKENIZER_NAME)
    if tokenizer != TOKENIZER_NAME:
        raise ValueError(f"{path}: its tokenizer is {described(tokenizer)}; this LightGPT reads {TOKENIZER_NAME}")
