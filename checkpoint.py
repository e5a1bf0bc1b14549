"""Checkpoint and adapter files: what they hold, written atomically, read safely, older formats upgraded."""

import hashlib
import json
import math
import os
import pickle
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from conversations import PromptTemplate
from distributed import from_rank_zero, rank, world_size
from files import file_in_the_way, holding_lock, os_error_in, remove_stray_temporary_files, write_atomically
from formats import FORMAT_VERSION, current_name, name_in_version, upgraded, upgraded_template
from integrity import (
    CHECKSUMS,
    SHARD_CHECKSUMS,
    check_tokenizer,
    checked_model,
    checked_tensors,
    context_length,
    file_checksums,
    finite,
    model_config,
    tensor_checksums,
    verify_checksums,
    verify_file_checksums,
)
from model import SHAPE_FIELDS, LightGPT, LightGPTConfig, described
from tokenizer import TOKENIZER_NAME

PRETRAINING_ENTRIES = ("model_args", "model")
ADAPTER_ENTRIES = ("lora_args", "model_args", "lora", "prompt_template")
DEFAULT_CHECKPOINT_PATH = "./out/checkpoint.pt"
# An exported folder (export.py, or its copy on the Hub): the mixin's model.safetensors and config.json.
EXPORTED_CONFIG, EXPORTED_WEIGHTS = "config.json", "model.safetensors"
# The one matrix of the token embeddings and the output layer (LightGPT.tie_weights), under its two names.
TIED_WEIGHTS = ("token_embeddings.weight", "output_layer.weight")


# A sharded checkpoint is a folder: this index holds all but the tensors of the model and the optimizer state,
# which are in the folder of shards that the index names.
SHARDED_INDEX = "checkpoint.pt"
# What torch.distributed.checkpoint's metadata file (a pickle) is made of, as exact (module, name) pairs; anything
# else is refused. Only tensors are saved, so BytesStorageMetadata, which DCP would load with a full unpickler, is
# not among them.
METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")} | {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}


def training_checkpoint(model_args: dict, block_size: int, optimizer: dict, step: int, epoch: int,
                        rng: list[dict], args: dict, *, grad_scaler: dict, **entries) -> dict:
    """What every checkpoint a training run writes holds: the format version, the model's shape and context,
    the tokenizer, the optimizer and fp16's loss scaler (empty under other precisions), the progress, every
    rank's random-number state and the run's flags; `entries` adds what the kind of run needs (pre-training:
    model and sampler; instruction tuning: the adapters, their base and prompt template)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_args": model_args,
        "block_size": block_size,
        "tokenizer": TOKENIZER_NAME,
        "optimizer": optimizer,
        "grad_scaler": grad_scaler,
        "step": step,
        "epoch": epoch,
        "rng": rng,
        "args": args,
    } | entries


def save_atomically(checkpoint: dict, path: str | Path) -> None:
    """torch.save to a temporary name, then rename (see write_atomically), with a checksum of each tensor."""
    if checksums := tensor_checksums(checkpoint):
        checkpoint = checkpoint | {CHECKSUMS: checksums}
    write_atomically(path, lambda file: torch.save(checkpoint, file))


def write_failure(error: BaseException) -> str:
    """Why a write failed, in a few words: the OSError behind it (no space left on device), else its last line."""
    if isinstance(error, CheckpointException) and error.failures:  # DCP's: each failed rank's (exception, trace)
        error = next(iter(error.failures.values()))[0]
    cause = os_error_in(error)
    if cause is not None:
        return cause.strerror or str(cause)
    return (str(error).strip() or type(error).__name__).splitlines()[-1][:200]


def metrics_path(checkpoint_path: str | Path) -> Path:
    """The metrics log a training run keeps beside its checkpoint."""
    return Path(checkpoint_path).with_suffix(".metrics.jsonl")


def lock_path(checkpoint_path: str | Path) -> Path:
    path = Path(checkpoint_path)
    return path.with_name(f"{path.name}.lock")


@contextmanager
def claimed_checkpoint(checkpoint_path: str | Path, inputs: dict[str, list[Path]], sharded: bool = False,
                       resume: bool = False) -> Iterator[None]:
    """The files a training run writes, claimed before any work and held until the block ends: the checkpoint,
    its metrics log and its lock are checked (check_outputs), the lock is taken (exclusive_lock), and the
    temporary files that dead processes left of them are removed. `inputs`: each input flag's files, which the
    run must never write over; sharded: the checkpoint is a folder (--checkpoint_format sharded); resume: the
    run continues the checkpoint there (--resume), which it may then write over."""
    check_outputs(checkpoint_path, inputs, sharded, resume)
    with exclusive_lock(checkpoint_path):
        remove_stray_temporary_files([Path(checkpoint_path), metrics_path(checkpoint_path)])
        yield


def check_outputs(checkpoint_path: str | Path, inputs: dict[str, list[Path]], sharded: bool = False,
                  resume: bool = False) -> None:
    """Raise a one-line ValueError when the checkpoint, its metrics log or its lock cannot be a file (a folder
    is in the way, or a file where a folder should be), or is one of the run's inputs, or when a run that does
    not resume would write over a checkpoint (check_not_overwriting). A sharded checkpoint is a folder itself."""
    checkpoint_path = Path(checkpoint_path)
    for output in (checkpoint_path, metrics_path(checkpoint_path), lock_path(checkpoint_path)):
        if output.is_dir() and not (sharded and output == checkpoint_path):
            raise ValueError(f"--checkpoint_path {checkpoint_path}: {output} is a folder, where a file must go; "
                             f"name a file, such as {checkpoint_path / 'checkpoint.pt'}")
        if blocking := file_in_the_way(output.parent):
            raise ValueError(f"--checkpoint_path {checkpoint_path}: {blocking} is a file, not a folder")
        for flag, files in inputs.items():
            if output.exists() and any(os.path.samefile(output, file) for file in files):
                raise ValueError(f"--checkpoint_path {checkpoint_path}: {output} is also {flag}, an input of "
                                 f"this run; choose another --checkpoint_path")
    if not resume:
        check_not_overwriting(checkpoint_path)


@contextmanager
def exclusive_lock(checkpoint_path: str | Path) -> Iterator[None]:
    """Hold <checkpoint>.lock (see files.holding_lock), so that a second run writing the same checkpoint is
    refused with one line that names the holder."""
    path = lock_path(checkpoint_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+")
    except OSError as error:
        raise ValueError(f"--checkpoint_path {checkpoint_path}: cannot write in {path.parent} "
                         f"({error.strerror or error})") from None

    def refuse(holder: str) -> None:
        raise ValueError(f"--checkpoint_path {checkpoint_path}: another run (process {holder or 'unknown'}) is "
                         f"writing this checkpoint; wait for it to end, or choose another --checkpoint_path")

    with file, holding_lock(file, "--checkpoint_path", refuse):
        yield


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a sharded checkpoint (a folder that pre-train.py --checkpoint_format sharded wrote)."""
    return (Path(path) / SHARDED_INDEX).is_file()


def holds_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint is there: a file, or a folder of shards with its index."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def check_checkpoint_path(checkpoint_path: str | Path, resume: bool, what: str = "checkpoint") -> None:
    """Raise a one-line ValueError when --resume finds no checkpoint at --checkpoint_path; `what` names its kind."""
    path = Path(checkpoint_path)
    if resume and not holds_checkpoint(path):
        raise ValueError(f"--resume: no {what} at --checkpoint_path {path}")


def check_not_overwriting(checkpoint_path: str | Path) -> None:
    """Raise a one-line ValueError when a new run (without --resume) would write over a checkpoint (a file or a
    folder of shards) at --checkpoint_path, and with it hours of training, as Hugging Face's Trainer refuses an
    output_dir that is not empty: the line names its step and the ways out."""
    path = Path(checkpoint_path)
    if not holds_checkpoint(path):
        return
    try:
        step = load_index(path, required=()).get("step")
    except (OSError, ValueError):
        raise ValueError(f"--checkpoint_path {path}: already holds a file that is not a readable checkpoint; choose "
                         f"another --checkpoint_path (or remove it)") from None
    saved_at = f", saved at step {step}" if type(step) is int else ""
    raise ValueError(f"--checkpoint_path {path}: already holds a checkpoint{saved_at}; add --resume to continue it, "
                     f"or choose another --checkpoint_path (or remove it) to start anew")


def save_sharded(checkpoint: dict, path: str | Path) -> None:
    """Save a training_checkpoint whose model and optimizer state are this rank's shards; every rank calls it.

    Each rank writes its shards into a new folder inside `path` with torch.distributed.checkpoint, all at
    once; then rank 0 writes the rest as the index, which names that folder, atomically, and removes the
    folders of earlier saves. Until the index is renamed into place, the previous checkpoint stays whole.
    """
    path = Path(path)
    shards = from_rank_zero(f"shards-{checkpoint['step']}-{secrets.token_hex(4)}")
    optimizer = checkpoint["optimizer"]
    try:
        with without_the_one_process_warning():
            dcp.save({"model": checkpoint["model"], "optimizer": optimizer["state"]}, checkpoint_id=path / shards)
    except (Exception, CheckpointException) as error:  # a full disk: no half-written folder of shards stays
        shutil.rmtree(path / shards, ignore_errors=True)
        raise OSError(f"could not write {path / shards}: {write_failure(error)}") from None
    if rank() == 0:
        index = {name: entry for name, entry in checkpoint.items() if name != "model"}
        try:
            save_atomically(index | {"optimizer": {"param_groups": optimizer["param_groups"]}, "shards": shards,
                                     SHARD_CHECKSUMS: file_checksums(path / shards)}, path / SHARDED_INDEX)
        except OSError:
            shutil.rmtree(path / shards, ignore_errors=True)
            raise
        for folder in path.glob("shards-*"):
            if folder.name != shards:
                shutil.rmtree(folder)


def load_shards(path: str | Path, index: dict, state: dict, alone: bool = False) -> None:
    """Fill `state`, shaped like what save_sharded wrote ({"model": ..., "optimizer": ...}, or a part of it)
    and holding this rank's shards, with the tensors of the sharded checkpoint at `path`, in place: each rank
    reads its own parts, whatever the number of ranks that wrote them. alone: in this process only, even under
    torchrun. Shards of an older format keep the parameter names they were written with: they are read under
    those names into the same tensors."""
    folder = shards_folder(path, index)
    if SHARD_CHECKSUMS in index:  # each rank verifies its share of the files (all of them when alone)
        verify_file_checksums(folder, index[SHARD_CHECKSUMS], *((0, 1) if alone else (rank(), world_size())))
    reader = CheckedShardsReader(folder, safe_metadata(folder))
    version = index.get("written_in_format", FORMAT_VERSION)
    written = {part: {name_in_version(name, version): value for name, value in entries.items()}
               for part, entries in state.items()}
    try:
        with without_the_one_process_warning():
            dcp.load(written, storage_reader=reader, no_dist=alone)
    except (Exception, CheckpointException) as error:  # DCP gathers the ranks' failures (a missing or cut shard)
        reason = (str(error).strip() or type(error).__name__).splitlines()[-1]
        raise ValueError(f"{folder}: its shards cannot be read, the checkpoint is damaged ({reason[:200]})") from None
    for part, entries in state.items():  # DCP replaces what is not a tensor rather than filling it
        entries.update((name, written[part][name_in_version(name, version)]) for name in entries)


class CheckedShardsReader(FileSystemReader):
    """DCP's reader of a folder of shards, given the metadata that safe_metadata checked: DCP's own reader would
    unpickle the folder's .metadata again with plain pickle, or, failing that, an unchecked __<rank>.metadata."""

    def __init__(self, folder: Path, metadata: Metadata):
        super().__init__(folder)
        self.checked_metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self.checked_metadata.storage_meta = StorageMeta(load_id=self.load_id)  # where DCP looks for its load id
        return self.checked_metadata


def inside(folder: Path, name: object, what: str) -> Path:
    """folder / name, where a name read from a checkpoint must stay inside the checkpoint's folder."""
    if not isinstance(name, str) or not (folder / name).resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder}: {what} {name!r} is not a name inside the folder; refusing to read it")
    return folder / name


def shards_folder(path: str | Path, index: dict) -> Path:
    """The folder of shards that a sharded checkpoint's index names."""
    return inside(Path(path), index["shards"], "the index's shards entry")


@contextmanager
def without_the_one_process_warning() -> Iterator[None]:
    """Silence DCP's warning, on every save and load without a process group, that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def safe_metadata(folder: Path) -> Metadata:
    """torch.distributed.checkpoint's metadata of a folder of shards, unpickled with only the classes that it
    is made of (the file is a pickle, and plain unpickling would run any code in it), and naming only files in
    the folder."""
    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # a dotted name (protocol 4) would reach through an allowed module to anything it imports
            dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
            if (module, name) in METADATA_GLOBALS or dtype:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint")

    try:
        with open(folder / ".metadata", "rb") as file:
            metadata = MetadataUnpickler(file).load()
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"{folder}: not a readable folder of shards ({error})") from None
    if not (isinstance(metadata, Metadata) and isinstance(metadata.storage_data, dict)
            and isinstance(metadata.state_dict_metadata, dict)
            and all(isinstance(item, TensorStorageMetadata) for item in metadata.state_dict_metadata.values())):
        raise ValueError(f"{folder}: not a readable folder of shards (its .metadata is not DCP's metadata of tensors)")
    for storage in metadata.storage_data.values():
        inside(folder, getattr(storage, "relative_path", None), "the shard file")
    return metadata


def whole_weights(path: str | Path, index: dict) -> dict[str, Tensor]:
    """The model weights of a sharded checkpoint, read whole into this process's memory, once their names, shapes
    and dtypes are known to be those of its model_args (else a one-line ValueError)."""
    weights = {name: torch.empty_like(tensor, device="cpu") for name, tensor in sharded_weights(path, index).items()}
    load_shards(path, index, {"model": weights}, alone=True)
    return weights


def sharded_weights(path: str | Path, index: dict) -> dict[str, Tensor]:
    """The model weights of a sharded checkpoint as its metadata describes them (tensors on the meta device, of
    their names, shapes and dtypes), once known to make the LightGPT of its model_args (checked_model)."""
    metadata = safe_metadata(shards_folder(path, index))
    version = index.get("written_in_format", FORMAT_VERSION)
    weights = {current_name(name.removeprefix("model."), version):
               torch.empty(item.size, dtype=item.properties.dtype, device="meta")
               for name, item in metadata.state_dict_metadata.items() if name.startswith("model.")}
    checked_model(index | {"model": weights}, path)
    return weights


def sharded_optimizer_state(path: str | Path, index: dict) -> dict:
    """The optimizer state of a sharded checkpoint as its index and metadata describe it, in the form of an
    optimizer's state_dict keyed by parameter names: its parameter groups, and each state tensor on the meta
    device (of its shape), for integrity.check_optimizer_state before DCP reads a byte of it."""
    metadata = safe_metadata(shards_folder(path, index))
    version = index.get("written_in_format", FORMAT_VERSION)
    state = {}
    for name, item in metadata.state_dict_metadata.items():
        if name.startswith("optimizer.") and isinstance(item, TensorStorageMetadata):
            parameter, entry = name.removeprefix("optimizer.").rsplit(".", 1)  # "<parameter>.<exp_avg...>"
            state.setdefault(current_name(parameter, version), {})[entry] = torch.empty(item.size, device="meta")
    optimizer = index.get("optimizer")
    return {"param_groups": optimizer.get("param_groups") if isinstance(optimizer, dict) else None, "state": state}


def load_checkpoint(path: str | Path, required: tuple[str, ...] = PRETRAINING_ENTRIES) -> dict:
    """A checkpoint written by pre-train.py (or, with required=ADAPTER_ENTRIES, an adapter), loaded safely onto
    the CPU, in the current format. A file is memory-mapped, so that its tensors are read as they are used; of a
    sharded checkpoint, the model's weights are read whole and the optimizer state is left out (a resumed run
    reads it shard by shard: load_shards)."""
    index = load_index(path, required)
    if not is_sharded_checkpoint(path):
        return index
    return index | {"model": whole_weights(path, index)}


def load_index(path: str | Path, required: tuple[str, ...] = PRETRAINING_ENTRIES) -> dict:
    """load_checkpoint without reading any weights: of a sharded checkpoint its index, of a file the whole
    checkpoint, memory-mapped."""
    path = Path(path)
    sharded = is_sharded_checkpoint(path)
    if sharded:
        path, required = path / SHARDED_INDEX, (*(entry for entry in required if entry != "model"), "shards")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there"
                                + (f", and no {SHARDED_INDEX} in the folder" if path.is_dir() else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not set(required) <= checkpoint.keys():
        raise ValueError(f"{path}: not a LightGPT checkpoint of this kind (no {' and '.join(required)} entries)")
    check_tokenizer(checkpoint, path)
    if sharded and not isinstance(checkpoint["shards"], str):
        raise ValueError(f"{path}: its shards entry must name the folder of shards, got {described(checkpoint['shards'])}")
    if CHECKSUMS in checkpoint:  # the optimizer state, unused but for resuming, is verified when resumed
        verify_checksums(checkpoint, checkpoint[CHECKSUMS], path, skip=("optimizer",))
    version = checkpoint.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: written in checkpoint format {version!r}, newer than this LightGPT's "
                         f"{FORMAT_VERSION}; update LightGPT")
    return upgraded(checkpoint) if version < FORMAT_VERSION else checkpoint


def load_lora_checkpoint(path: str | Path) -> dict:
    """An adapter checkpoint written by instruction-tune.py, loaded as load_checkpoint loads, its entries
    checked (check_adapter)."""
    adapter = load_checkpoint(path, required=ADAPTER_ENTRIES)
    check_adapter(adapter, path)
    return adapter


def check_adapter(adapter: dict, path: str | Path) -> None:
    """Raise a one-line ValueError naming the first entry of an adapter checkpoint that is not what
    instruction-tune.py writes: lora_args (a rank of at least 1, a positive alpha, a dropout in [0, 1)), its base's
    model_args, the adapter matrices, the prompt template and the base's path."""
    lora_args = adapter["lora_args"]
    if not isinstance(lora_args, dict):
        raise ValueError(f"{path}: its lora_args must be a dictionary, got {described(lora_args)}")
    rank, alpha, dropout = lora_args.get("rank"), lora_args.get("alpha"), lora_args.get("dropout", 0.0)
    if type(rank) is not int or rank < 1:
        raise ValueError(f"{path}: its lora_args rank must be a whole number of at least 1, got {described(rank)}")
    if type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise ValueError(f"{path}: its lora_args alpha must be a positive finite number, got {described(alpha)}")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: its lora_args dropout must be a number in [0, 1), got {described(dropout)}")
    config = model_config(adapter["model_args"], path)
    checked_tensors(adapter["lora"], path)
    vocabulary_size = adapted_vocabulary_size(adapter, config.vocabulary_size)
    if type(vocabulary_size) is not int or vocabulary_size < config.vocabulary_size:
        raise ValueError(f"{path}: its vocabulary_size must be a whole number of at least its base's "
                         f"{config.vocabulary_size}, got {described(vocabulary_size)}")
    saved_template(adapter["prompt_template"], path, vocabulary_size)
    base = adapter.get("base_model_path")
    if base is not None and (not isinstance(base, str) or not base or "\0" in base):
        raise ValueError(f"{path}: its base_model_path must be the path of a checkpoint, got {described(base)}")


def adapted_vocabulary_size(adapter: dict, base_vocabulary_size: int):
    """The vocabulary of the model an adapter makes: a chat adapter grows its base's (its vocabulary_size entry),
    and an adapter trained on one keeps that in its merged_adapter entry."""
    while isinstance(adapter, dict):
        if "vocabulary_size" in adapter:
            return adapter["vocabulary_size"]
        adapter = adapter.get("merged_adapter")
    return base_vocabulary_size


def saved_template(saved: dict | None, path: str | Path, vocabulary_size: int | None = None) -> PromptTemplate | None:
    """The template an adapter or an exported folder stored, or a one-line ValueError naming the file; given the
    model's vocabulary_size, every token id the template holds must be below it."""
    try:
        template = PromptTemplate.from_dict(saved) if saved is not None else None
        if template is not None and vocabulary_size is not None:
            template.check_vocabulary(vocabulary_size)
        return template
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def model_from_checkpoint(checkpoint: dict, path: str | Path) -> LightGPT:
    """The model of a checkpoint dictionary read from `path` (see load_checkpoint), with its weights, on the CPU,
    or a one-line ValueError when its model_args or weights are not those of a LightGPT. The model takes the
    checkpoint's tensors as its parameters, memory-mapped from the file: building it never holds the weights twice,
    and nothing is allocated before the weights are known to fit."""
    config = checked_model(checkpoint, path)
    with torch.device("meta"):
        model = LightGPT(config)
    model.load_state_dict(checkpoint["model"], assign=True)
    model.tie_weights()
    return finite(model, path)


def load_model(path: str | Path | None, device: str = "cpu", *, dtype: torch.dtype = torch.float32
               ) -> tuple[LightGPT, int, dict | None]:
    """The model a pre-training checkpoint or an exported folder holds (by default ./out/checkpoint.pt), in
    evaluation mode on the device and in dtype, its training context length, and the prompt template (as a dict)
    of an instruction-tuned export, else None. An adapter: finetuning.load_inference_model."""
    path = path or DEFAULT_CHECKPOINT_PATH
    if is_exported(path):
        model, block_size, template = load_exported(path)
        return model.to(device, dtype), block_size, template
    checkpoint = load_checkpoint(path)
    block_size = context_length(checkpoint, path)
    return model_from_checkpoint(checkpoint, path).to(device, dtype).eval(), block_size, None


def is_exported(path: str | Path) -> bool:
    """Whether path is an exported folder rather than a checkpoint file."""
    return (Path(path) / EXPORTED_CONFIG).is_file()


def exported_config(model: LightGPT, block_size: int, prompt_template: dict | None = None) -> dict:
    """What an exported folder's config.json holds: the LightGPTConfig fields (from_pretrained builds the model from
    them) and what generation needs besides: the tokenizer, the context length the model was trained with and, when
    it was instruction-tuned, the prompt template."""
    config = asdict(model.config) | {"tokenizer": TOKENIZER_NAME, "block_size": block_size,
                                     CHECKSUMS: tensor_checksums(model.state_dict())}
    if prompt_template:
        config["prompt_template"] = prompt_template
    return config


def load_exported(folder: str | Path) -> tuple[LightGPT, int, dict | None]:
    """The model of an exported folder, in evaluation mode on the CPU, with its training context length and its
    prompt template (None unless it was instruction-tuned). Its config.json gets a checkpoint's checks (the model's
    fields, block_size, the tokenizer, the template), and its weights' names, shapes and dtypes are checked against
    the configuration before anything is allocated, and against their checksums when config.json has them; a
    problem is a one-line ValueError."""
    folder = Path(folder)
    config_path, weights_path = folder / EXPORTED_CONFIG, folder / EXPORTED_WEIGHTS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_path}: not the configuration of an exported LightGPT ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not the configuration of an exported LightGPT (a JSON "
                         f"{type(config).__name__}, not an object)")
    block_size = context_length(config, config_path)
    check_tokenizer(config, config_path)
    template = config.get("prompt_template")
    if isinstance(template, dict) and "with_input" in template:  # exported before templates were objects
        template = upgraded_template(template)
    model_fields = {field.name for field in fields(LightGPTConfig)}
    model_args = {name: value for name, value in config.items() if name in model_fields}
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: no {EXPORTED_WEIGHTS} there")
    try:
        weights = safetensors.torch.load_file(weights_path)
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{weights_path}: not readable safetensors weights ({error})") from None
    if CHECKSUMS in config:
        verify_checksums(weights, config[CHECKSUMS], weights_path)
    # An exported folder has no format version: the names of every earlier format are renamed (body: blocks).
    weights = {current_name(name, 1): tensor for name, tensor in weights.items()}
    for name, other in (TIED_WEIGHTS, TIED_WEIGHTS[::-1]):  # save_pretrained writes the tied matrix once
        if name not in weights and other in weights:
            weights[name] = weights[other]
    model = model_from_checkpoint({"model_args": model_args, "model": weights}, folder).eval()
    saved_template(template, config_path, model.vocabulary_size)
    return model, block_size, template


def weights_fingerprint(state: dict[str, Tensor]) -> str:
    """A short hash of a model's weights, from the first and last thousand numbers of each tensor: enough to tell
    the base an adapter was trained on from another base of the same shape, quickly at any model size."""
    digest = hashlib.sha256()
    for name in sorted(state):
        numbers = state[name].detach().flatten()
        digest.update(name.encode())
        digest.update(torch.cat([numbers[:1000], numbers[-1000:]]).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def trained_on_these_weights(adapter: dict, base: dict) -> bool:
    """Whether the adapter was trained on the base's very weights (true of adapters that predate fingerprints).
    Each format fingerprinted the names of its time, so the base is fingerprinted under each version's names."""
    fingerprint = adapter.get("base_fingerprint")
    return fingerprint is None or fingerprint in (
        weights_fingerprint({name_in_version(name, version): tensor for name, tensor in base["model"].items()})
        for version in range(FORMAT_VERSION, 0, -1))


def check_same_base(adapter: dict, base: dict) -> None:
    """Raise a one-line ValueError when the adapter was trained on a base model of another shape."""
    # As the configs resolve them: model_args from before grouped-query attention have no num_kv_heads.
    adapter_config, base_config = LightGPTConfig(**adapter["model_args"]), LightGPTConfig(**base["model_args"])
    for name in SHAPE_FIELDS:
        trained_on, given = getattr(adapter_config, name), getattr(base_config, name)
        if trained_on != given:
            raise ValueError(
                f"the adapter was trained on a base model with {name}={trained_on}, "
                f"but the base checkpoint has {name}={given}"
            )
