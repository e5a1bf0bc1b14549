"""LoRA fine-tuning that any script shares: the adapted model, the adapter checkpoint, resuming it, and the one
policy for loading an adapter onto a base (for generation, export and resuming alike).

The policy: an adapter loads only onto a base of its shape (check_same_base) and with the very weights it was
trained on (its fingerprint; adapters older than fingerprints are taken on trust), else one line that names both
files. A merged adapter on other weights gives answers nobody trained, whether it is resumed, exported or asked.
An adapter trained on a model that already had one merged (preference tuning on a chat adapter) holds that one as
its merged_adapter, and loading merges both in order, onto the base both were trained on.
"""

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module

from checkpoint import (
    check_same_base,
    holds_checkpoint,
    is_exported,
    load_checkpoint,
    load_lora_checkpoint,
    load_model,
    model_from_checkpoint,
    save_atomically,
    saved_template,
    trained_on_these_weights,
    training_checkpoint,
    weights_fingerprint,
)
from conversations import INSTRUCTION_EXTENSIONS, PromptTemplate
from devices import available_memory, compiles, compute_dtype, gradient_scaler
from distributed import parallelize
from files import same_files
from flags import run_config
from integrity import (
    check_finite,
    check_optimizer_state,
    check_resumable_entries,
    context_length,
    finite,
    verify_optimizer_state,
)
from lora import (
    add_lora,
    added_rows,
    grow_vocabulary,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    train_added_rows,
)
from model import SHAPE_FIELDS, LightGPT
from sizing import Architecture, activation_peak_bytes, gigabytes
from training import (
    LossFunction,
    language_model_loss,
    note_optimizer_starts_afresh,
    restore_rng_state,
    restore_scaler,
    rng_state,
    train,
    weighted_by_targets,
)


class Samples(Protocol):
    """What a fine-tuning script's data offers: its number of samples, and a batch of them as inputs and targets
    padded on the right (targets with the model's padding_index, which the loss leaves out)."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]: ...

    def largest_batch(self, batch_size: int) -> tuple[int, int]: ...


def lora_args(args) -> dict:
    """The adapters' shape and dropout, from the flags --rank, --alpha and --dropout."""
    return {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout}


def lora_model(base: dict, base_path: str | Path, lora_args: dict, device: str) -> LightGPT:
    """The base checkpoint's model, frozen, with a fresh LoRA adapter on every block's matrices, once they are
    known to fit in the memory of the device they will train on (check_adapter_memory). lora_args: rank, alpha and
    dropout (which the frozen model uses too)."""
    model_args = base["model_args"] | {"dropout": lora_args["dropout"]}
    model = model_from_checkpoint(base | {"model_args": model_args}, base_path)
    check_adapter_memory(model, lora_args["rank"], device)
    add_lora(model, **lora_args)
    return model


def check_adapter_memory(model: LightGPT, rank: int, device: str) -> None:
    """Raise a one-line ValueError, before the adapters are allocated, when their weights, gradients and AdamW's
    two moments (4 numbers each, in float32) exceed the memory the device has: --rank 100000000 was killed by
    the kernel after 43 s, without a word."""
    layers = [module for module in model.blocks.modules() if isinstance(module, torch.nn.Linear)]
    adapter_parameters = sum(rank * (layer.in_features + layer.out_features) for layer in layers)
    needed = 4 * 4 * adapter_parameters
    available = available_memory(torch.device(device))
    if needed > available:
        raise ValueError(f"--rank {rank}: the adapters need about {gigabytes(needed)} to train, more than the "
                         f"{gigabytes(available)} available on {device}; choose a smaller --rank")


def check_batch_memory(model: LightGPT, samples: Samples, batch_size: int, mixed_precision: bool,
                       activation_checkpointing: bool, device: torch.device) -> None:
    """Raise a one-line ValueError, before training starts, when the activations of the largest micro-batch
    (sizing.activation_peak_bytes: at most --batch_size samples, each padded to the longest) exceed the memory the
    device has left: a --batch_size beyond the dataset's size makes one batch of all of it."""
    rows, tokens = samples.largest_batch(batch_size)
    config = model.config
    architecture = Architecture(block_size=tokens, **{name: getattr(config, name) for name in SHAPE_FIELDS})
    needed = activation_peak_bytes(architecture, rows, mixed_precision, activation_checkpointing)
    available = available_memory(device)
    if needed > available:
        raise ValueError(f"--batch_size {batch_size}: a batch of {rows:,} rows of up to {tokens:,} tokens needs about "
                         f"{gigabytes(needed)} for its activations, more than the {gigabytes(available)} available "
                         f"on {device}; choose a smaller --batch_size (and more --gradient_accumulation_steps)"
                         + ("" if activation_checkpointing else ", or --activation_checkpointing"))


def resumable_adapters(path: str | Path) -> dict:
    """The adapter checkpoint to resume: load_lora_checkpoint's, its optimizer state verified too, its progress
    entries checked (check_resumable_entries) and its adapters finite."""
    checkpoint = load_lora_checkpoint(path)
    verify_optimizer_state(checkpoint, path)
    check_resumable_entries(checkpoint, path)
    check_finite(checkpoint["lora"], path)
    return checkpoint


def add_chat_tokens(model: LightGPT, vocabulary_size: int) -> None:
    """Grow an adapted model's tied embedding to vocabulary_size (a chat template's tokens after the base's), the
    new rows drawn as the others were and trained with the adapters; the base's rows stay frozen."""
    base_vocabulary = model.vocabulary_size
    grow_vocabulary(model, vocabulary_size)
    train_added_rows(model, base_vocabulary)


def chat_token_entries(model: LightGPT, base: dict) -> dict:
    """What an adapter holds for the chat tokens: their embedding rows (all it changes of the base's weights) and
    the grown vocabulary; nothing for a model of the base's vocabulary, or whose rows came with a merged adapter
    (frozen, as in preference tuning)."""
    base_vocabulary = base["model_args"]["vocabulary_size"]
    if model.vocabulary_size == base_vocabulary or not model.token_embeddings.weight.requires_grad:
        return {}
    return {"added_token_embeddings": added_rows(model, base_vocabulary), "vocabulary_size": model.vocabulary_size}


def adapter_checkpoint(model: LightGPT, base: dict, base_path: str | Path, lora_args: dict, template: PromptTemplate,
                       *progress, **entries) -> dict:
    """What an adapter file holds: a training_checkpoint (progress: its optimizer, step, epoch, rng and args;
    entries: its grad_scaler and what the script adds), the adapters and their lora_args, the base they were
    trained on (its path, shape and fingerprint) and the prompt template that generation must use."""
    return training_checkpoint(
        base["model_args"], base["block_size"], *progress, lora_args=lora_args,
        base_model_path=str(Path(base_path).resolve()), base_fingerprint=weights_fingerprint(base["model"]),
        prompt_template=template.to_dict(), lora=lora_state_dict(model), **entries)


# The flags of every fine-tuning run that a resumed run must repeat: they change what the adapters learn.
ADAPTER_FLAGS = ("rank", "alpha")
# What an adapter is, by whether it is stacked on a merged one.
ADAPTER_KINDS = {False: "an instruction adapter (instruction-tune.py's)",
                 True: "a preference adapter (preference-tune.py's)"}


def check_same_adapters(checkpoint: dict, base: dict, base_path: str | Path, args, fixed_flags: tuple[str, ...] = (),
                        stacked: bool = False) -> None:
    """Resuming must continue the same adapters (stacked on a merged adapter, as preference-tune.py's are, or not)
    on the same base and dataset, with the same ADAPTER_FLAGS and fixed_flags: a one-line ValueError otherwise."""
    if ("merged_adapter" in checkpoint) != stacked:
        raise ValueError(f"--resume: --checkpoint_path {args.checkpoint_path} is "
                         f"{ADAPTER_KINDS['merged_adapter' in checkpoint]}, not {ADAPTER_KINDS[stacked]}; give "
                         f"the adapter to resume, or start anew without --resume")
    check_same_base(checkpoint, base)
    if not trained_on_these_weights(checkpoint, base):
        raise ValueError(f"--resume: the adapters were trained on a base with other weights than "
                         f"--base_model_path {base_path}; use the original base checkpoint")
    trained_with = checkpoint.get("args", {}) | checkpoint["lora_args"]
    for name in (*ADAPTER_FLAGS, *fixed_flags):
        if name in trained_with and trained_with[name] != getattr(args, name):
            raise ValueError(f"--resume: the checkpoint was trained with {as_typed(name, trained_with[name])}, the "
                             f"flags ask for {as_typed(name, getattr(args, name))}; repeat the original run's flags")
    if "dataset" in trained_with and (trained_with["dataset"] != args.dataset or not same_files(
            trained_with.get("dataset_path"), args.dataset_path, INSTRUCTION_EXTENSIONS)):
        raise ValueError(f"--resume: the checkpoint was trained on {dataset_flags(trained_with)}, the flags ask for "
                         f"{dataset_flags(vars(args))}; use the original dataset, or start anew without --resume")


def as_typed(flag: str, value) -> str:
    """A flag's value as a user types it: --rank 8, --mask_input, --no-mask_input, or no --max_tokens_per_sample."""
    if value is None:
        return f"no --{flag}"
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def dataset_flags(flags: dict) -> str:
    """The flags that chose a run's dataset, as a user typed them."""
    return f"--dataset {flags['dataset']}" + (f" --dataset_path {flags.get('dataset_path')}"
                                              if flags["dataset"] == "local" else "")


def check_same_samples(checkpoint: dict, num_samples: int, what: str) -> None:
    """Resuming must see the samples the run was trained on, which fix its steps and their order: their number
    after those too long were dropped, the same for the same data and flags."""
    trained_on = checkpoint.get("num_train_samples", num_samples)
    if trained_on != num_samples:
        raise ValueError(f"--resume: the checkpoint was trained on {trained_on:,} {what}, this dataset and these "
                         f"flags make {num_samples:,}; use the original dataset and flags")


def check_base_path(path: str | Path, flag: str, remedy: str) -> None:
    """Raise a one-line ValueError naming `flag` when path holds no checkpoint to tune: nothing, an exported
    folder, or no regular file (a FIFO or a link to /dev/zero, which would be read forever)."""
    path = Path(path)
    if is_exported(path):
        problem = (f"{path} is an exported folder (export.py's), which cannot be a base to tune; give the "
                   f"checkpoint it was exported from")
    elif path.exists() and not path.is_dir() and not path.is_file():
        problem = f"{path} is not a regular file but a FIFO, a device or a link to one, which could be read forever"
    elif not holds_checkpoint(path):
        problem = f"no checkpoint at {path}; {remedy}"
    else:
        return
    raise ValueError(f"{flag}: {problem}")


def resume_adapters(model: LightGPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    checkpoint: dict, device: torch.device, path: str | Path) -> int:
    """Load an adapter checkpoint's adapters, optimizer, random-number and loss-scaler states; its step."""
    try:
        load_lora_state_dict(model, checkpoint["lora"])
    except ValueError as error:
        raise ValueError(f"--resume: {path}: {error}") from None
    if "added_token_embeddings" in checkpoint:
        rows = checkpoint["added_token_embeddings"]
        with torch.no_grad():
            model.token_embeddings.weight[-len(rows):] = rows
    if checkpoint.get("optimizer"):
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        check_optimizer_state(checkpoint["optimizer"], optimizer,
                              {index: parameter.shape for index, parameter in enumerate(parameters)}, path)
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:
        note_optimizer_starts_afresh(path)
    if checkpoint.get("rng"):
        restore_rng_state(checkpoint["rng"][0], device)
    restore_scaler(scaler, checkpoint.get("grad_scaler"))
    return checkpoint.get("step", 0)


def load_adapted_model(adapter: dict, base: dict) -> LightGPT:
    """The base model with its adapter applied and merged (after the adapter it was trained on, if any): a plain
    LightGPT in eval mode. Only its shape is checked here: adapter_on_base applies the whole policy."""
    check_same_base(adapter, base)
    if "merged_adapter" in adapter:
        model = load_adapted_model(adapter["merged_adapter"], base)
    else:
        model = model_from_checkpoint(base, "the base checkpoint")
    if "added_token_embeddings" in adapter:  # a chat adapter's tokens after the base's vocabulary
        grow_vocabulary(model, adapter["vocabulary_size"], adapter["added_token_embeddings"])
    add_lora(model, **adapter["lora_args"])
    load_lora_state_dict(model, adapter["lora"])
    return merge_lora(model).eval()


# What a stacked adapter keeps of the adapter it was trained on: what loading it takes, and where it came from.
MERGED_ADAPTER_ENTRIES = ("model_args", "lora_args", "lora", "added_token_embeddings", "vocabulary_size",
                          "base_fingerprint", "prompt_template", "merged_adapter")


def merged_adapter_entry(adapter: dict, path: str | Path) -> dict:
    """The merged_adapter entry of an adapter trained on `adapter` merged into its base: its weights and how to
    apply them, its file and a fingerprint of its matrices (which a resumed run checks)."""
    return {name: adapter[name] for name in MERGED_ADAPTER_ENTRIES if name in adapter} | {
        "path": str(Path(path).resolve()), "fingerprint": weights_fingerprint(adapter["lora"])}


@contextmanager
def adapters_off(model: Module) -> Iterator[None]:
    """Run the model (as parallelize wrapped it, or not) without its LoRA adapters: the model they were added to,
    with no second copy in memory."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers.values():
            layer.enabled = True


def preference_loss(model: Module, inputs: Tensor, targets: Tensor, beta: float, label_smoothing: float = 0.0
                    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """DPO's sigmoid loss (Rafailov et al. 2023) on a micro-batch of pairs: inputs and targets (2 x pairs, sequence),
    the chosen responses' rows, then the rejected ones', their targets padding but on the response. The policy is
    the model with its adapters, the reference the same model with them off (adapters_off); both in one forward
    pass over the chosen and rejected rows each. label_smoothing > 0: conservative DPO, which takes each label as
    wrong with that probability. With TRL's figures: rewards/chosen and rewards/rejected (beta times the log-ratio
    of policy to reference), rewards/margins and rewards/accuracies (how often the chosen one's is higher). A
    training.RunConfig loss (see training.language_model_loss); units: pairs."""
    with torch.no_grad(), adapters_off(model):
        _, reference = model(inputs, targets, per_row=True)  # (2 x pairs,) summed cross entropies
    _, policy = model(inputs, targets, per_row=True)
    chosen, rejected = (beta * (reference - policy)).chunk(2)  # beta * log(pi / ref) of each, (pairs,)
    margins = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)
    chosen, rejected = chosen.detach(), rejected.detach()
    figures = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
               "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}
    return loss.mean(), figures, torch.tensor(len(chosen), device=loss.device)


def adapter_on_base(adapter: dict, base: dict, lora_path: str | Path, base_path: str | Path) -> LightGPT:
    """The adapter merged into the base under the policy (see the module's docstring), or a one-line ValueError."""
    try:
        model = load_adapted_model(adapter, base)
    except ValueError as error:
        raise ValueError(f"{lora_path} cannot be applied to {base_path}: {error}") from None
    if not trained_on_these_weights(adapter, base):
        raise ValueError(f"{lora_path} was trained on a base with other weights than {base_path} (of the same "
                         f"sizes); use the base it was trained on, {adapter.get('base_model_path', 'its own')}")
    return finite(model, lora_path)


def adapter_base(adapter: dict, lora_path: str | Path, base_path: str | Path | None) -> tuple[dict, str | Path]:
    """The base checkpoint to merge an adapter into, and its path: base_path, else the checkpoint the adapter
    names (its base_model_path); one line that names the adapter when it names none, or one that is not there or
    not a checkpoint (the path is read from the file: /etc/passwd said only '/etc/passwd: not a readable
    checkpoint')."""
    if base_path:
        return load_checkpoint(base_path), base_path
    named = adapter.get("base_model_path")
    if not named:
        raise ValueError(f"{lora_path}: the adapter names no base checkpoint; give one with --checkpoint_path")
    remedy = "give the base it was trained on with --checkpoint_path"
    try:
        return load_checkpoint(named), named
    except FileNotFoundError:
        raise FileNotFoundError(f"--lora_path {lora_path}: the base it names, {named}, is not there; {remedy}") from None
    except ValueError as error:
        reason = str(error).removeprefix(f"{named}: ")
        raise ValueError(f"--lora_path {lora_path}: the base it names, {named}, is not a usable checkpoint: "
                         f"{reason}; {remedy}") from None


def load_lora_model(lora_path: str | Path, base_path: str | Path | None = None
                    ) -> tuple[LightGPT, int, PromptTemplate]:
    """An adapter merged into its base (the checkpoint the adapter names, unless base_path is given), in eval
    mode on the CPU, with the base's context length and the prompt template the adapter was trained with."""
    adapter = load_lora_checkpoint(lora_path)
    base, base_path = adapter_base(adapter, lora_path, base_path)
    block_size = context_length(base, base_path)
    model = adapter_on_base(adapter, base, lora_path, base_path)
    return model, block_size, saved_template(adapter["prompt_template"], lora_path)


def load_inference_model(path: str | Path | None, device: str = "cpu", lora_path: str | Path | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[LightGPT, int, PromptTemplate | None]:
    """The model to generate with (checkpoint.load_model's, or with lora_path the adapter merged into its base),
    in eval mode on the device and in dtype, its context length and its prompt template, if it has one."""
    if lora_path is not None:
        model, block_size, template = load_lora_model(lora_path, path)
        return model.to(device, dtype), block_size, template
    model, block_size, template = load_model(path, device, dtype=dtype)
    return model, block_size, saved_template(template, path)


def epoch_order(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """A shuffle that depends only on the seed and the epoch (mixed into one generator seed, below 2**63), so a
    resumed run sees the same order without saving it."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**63))


def train_adapters(args, model: LightGPT, base: dict, template: PromptTemplate, train_samples: Samples,
                   test_samples: Samples, seed: int, checkpoint: dict | None, *, what: str, description: str,
                   program: str, loss_of: LossFunction = language_model_loss,
                   weigh: Callable[[list[tuple[Tensor, Tensor]], int], list[tuple]] = weighted_by_targets,
                   **entries) -> None:
    """Train the adapters of a model whose base is frozen, with AdamW, on shuffled batches of train_samples,
    evaluating on test_samples; save them with what generation needs to use them. The training loop of every
    fine-tuning script.

    Args:
        args: the flags of add_training_arguments, --rank, --alpha, --dropout, --base_model_path and --device.
        base: the base checkpoint; template: the prompt template the samples were rendered with.
        checkpoint: the adapter checkpoint to resume, if any, trained on as many samples (check_same_samples).
        what: what a sample is, for the opening line (instructions, conversations...).
        description, program: the progress bar's label and the script's name, for messages.
        loss_of: the loss (training.RunConfig's); weigh(batches, padding_index): the micro-batches of a step with
            their loss weights, their shares of the units loss_of averages over (targets, pairs).
        entries: what the script adds to its adapter checkpoint.
    """
    device = torch.device(args.device)
    model.to(device)
    dtype = compute_dtype(args.precision, device)
    try:
        if checkpoint:
            check_same_samples(checkpoint, len(train_samples), what)
        check_batch_memory(model, train_samples, args.batch_size, dtype != torch.float32,
                           args.activation_checkpointing, device)
    except ValueError as error:
        sys.exit(f"{program}: error: {error}")
    training_model = parallelize(model, device, args.activation_checkpointing, compiles(args.compile, device))
    scaler = gradient_scaler(device, dtype)
    embedding = model.token_embeddings.weight
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad and parameter is not embedding]
    groups = [{"params": adapters}]
    if embedding.requires_grad:  # the rows of a chat template's tokens; decay would shrink the frozen rows too
        groups.append({"params": [embedding], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=device.type == "cuda")

    samples_per_step = args.batch_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_samples) / samples_per_step)
    step = 0
    if checkpoint:
        try:
            step = resume_adapters(model, optimizer, scaler, checkpoint, device, args.checkpoint_path)
        except ValueError as error:  # an optimizer state that is not this optimizer's
            sys.exit(f"{program}: error: {error}")
        print(f"Resuming from {args.checkpoint_path} at epoch {step // steps_per_epoch + 1}, step {step}")

    eval_batches = weigh([test_samples.batch(indices.tolist())
                          for indices in torch.arange(len(test_samples)).split(args.batch_size)], model.padding_index)
    trained = sum(parameter.numel() for parameter in adapters) + sum(
        tensor.numel() for tensor in chat_token_entries(model, base).values() if isinstance(tensor, Tensor))
    print(f"LoRA: {trained:,} trainable adapter parameters on a frozen base of "
          f"{sum(parameter.numel() for parameter in model.parameters()) - trained:,}; "
          f"{len(train_samples)} training and {len(test_samples)} held-out {what}, "
          f"{steps_per_epoch} steps per epoch")

    def micro_batches_at(step: int) -> list[tuple]:
        epoch, position = divmod(step, steps_per_epoch)
        indices = epoch_order(seed, epoch, len(train_samples))[position * samples_per_step:][:samples_per_step]
        return weigh([train_samples.batch(chunk.tolist()) for chunk in indices.split(args.batch_size)],
                     model.padding_index)

    def save(step: int, epoch: int) -> None:
        save_atomically(adapter_checkpoint(
            model, base, args.base_model_path, lora_args(args), template, optimizer.state_dict(), step, epoch,
            [rng_state(device)], vars(args) | {"seed": seed}, grad_scaler=scaler.state_dict(), seed=seed,
            num_train_samples=len(train_samples), **entries,
            **chat_token_entries(model, base),
        ), args.checkpoint_path)

    run = run_config(args, steps_per_epoch=steps_per_epoch, unit="samples", units_per_epoch=len(train_samples),
                     description=description, saved_what="adapters", program=program, dtype=dtype, loss_of=loss_of)
    train(training_model, optimizer, micro_batches_at, eval_batches, save, run, step, scaler)
