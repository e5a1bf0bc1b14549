"""LoRA fine-tuning that any script shares: the adapted model, the adapter checkpoint, resuming it, and the one
policy for loading an adapter onto a base (for generation, export and resuming alike).

The policy: an adapter loads only onto a base of its shape (check_same_base) and with the very weights it was
trained on (its fingerprint; adapters older than fingerprints are taken on trust), else one line that names both
files. A merged adapter on other weights gives answers nobody trained, whether it is resumed, exported or asked.
An adapter trained on a model that already had one merged (preference tuning on a chat adapter) holds that one as
its merged_adapter, and loading merges both in order, onto the base both were trained on.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module

from checkpoint import (
    check_same_base,
    context_length,
    finite,
    load_checkpoint,
    load_lora_checkpoint,
    load_model,
    model_from_checkpoint,
    trained_on_these_weights,
    training_checkpoint,
    weights_fingerprint,
)
from conversations import PromptTemplate
from model import (
    LightGPT,
    add_lora,
    added_rows,
    lora_layers,
    grow_vocabulary,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    train_added_rows,
)
from training import note_optimizer_starts_afresh, restore_rng_state, restore_scaler


def lora_model(base: dict, base_path: str | Path, lora_args: dict) -> LightGPT:
    """The base checkpoint's model, frozen, with a fresh LoRA adapter on every block's matrices. lora_args: rank,
    alpha and dropout (which the frozen model uses too)."""
    model_args = base["model_args"] | {"dropout": lora_args["dropout"]}
    model = model_from_checkpoint(base | {"model_args": model_args}, base_path)
    add_lora(model, **lora_args)
    return model


def add_chat_tokens(model: LightGPT, vocabulary_size: int) -> None:
    """Grow an adapted model's tied embedding to vocabulary_size (a chat template's tokens after the base's), the
    new rows drawn as the others were and trained with the adapters; the base's rows stay frozen."""
    base_vocabulary = model.vocabulary_size
    grow_vocabulary(model, vocabulary_size)
    train_added_rows(model, base_vocabulary)


def chat_token_entries(model: LightGPT, base: dict) -> dict:
    """What an adapter holds for the chat tokens: their embedding rows (all it changes of the base's weights) and
    the grown vocabulary; nothing for a model of the base's vocabulary."""
    base_vocabulary = base["model_args"]["vocabulary_size"]
    if model.vocabulary_size == base_vocabulary:
        return {}
    return {"added_token_embeddings": added_rows(model, base_vocabulary), "vocabulary_size": model.vocabulary_size}


def adapter_optimizer(model: LightGPT, learning_rate: float, device: torch.device
                      ) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """AdamW over what an adapted model trains (fused on a GPU), and its adapters' matrices. The embedding, when
    its chat tokens' rows train, goes without weight decay, which would shrink its frozen rows too."""
    embedding = model.token_embeddings.weight
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad and parameter is not embedding]
    groups = [{"params": adapters}]
    if embedding.requires_grad:
        groups.append({"params": [embedding], "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type == "cuda"), adapters


def adapter_checkpoint(model: LightGPT, base: dict, base_path: str | Path, lora_args: dict, template: PromptTemplate,
                       *progress, **entries) -> dict:
    """What an adapter file holds: a training_checkpoint (progress: its optimizer, step, epoch, rng and args;
    entries: its grad_scaler and what the script adds), the adapters and their lora_args, the base they were
    trained on (its path, shape and fingerprint) and the prompt template that generation must use."""
    return training_checkpoint(
        base["model_args"], base["block_size"], *progress, lora_args=lora_args,
        base_model_path=str(Path(base_path).resolve()), base_fingerprint=weights_fingerprint(base["model"]),
        prompt_template=template.to_dict(), lora=lora_state_dict(model), **entries)


def check_same_adapters(checkpoint: dict, base: dict, base_path: str | Path, rank: int, alpha: float) -> None:
    """Resuming must continue the same adapters on the same base: a one-line ValueError otherwise."""
    check_same_base(checkpoint, base)
    if not trained_on_these_weights(checkpoint, base):
        raise ValueError(f"--resume: the adapters were trained on a base with other weights than "
                         f"--base_model_path {base_path}; use the original base checkpoint")
    for name, value in (("rank", rank), ("alpha", alpha)):
        if checkpoint["lora_args"][name] != value:
            raise ValueError(f"--resume: the checkpoint has --{name} {checkpoint['lora_args'][name]}, "
                             f"the flags ask for {value}; repeat the original run's flags")


def resume_adapters(model: LightGPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    checkpoint: dict, device: torch.device, path: str | Path) -> int:
    """Load an adapter checkpoint's adapters, optimizer, random-number and loss-scaler states; its step."""
    load_lora_state_dict(model, checkpoint["lora"])
    if "added_token_embeddings" in checkpoint:
        rows = checkpoint["added_token_embeddings"]
        with torch.no_grad():
            model.token_embeddings.weight[-len(rows):] = rows
    if checkpoint.get("optimizer"):
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


def load_lora_model(lora_path: str | Path, base_path: str | Path | None = None
                    ) -> tuple[LightGPT, int, PromptTemplate]:
    """An adapter merged into its base (the checkpoint the adapter names, unless base_path is given), in eval
    mode on the CPU, with the base's context length and the prompt template the adapter was trained with."""
    adapter = load_lora_checkpoint(lora_path)
    base_path = base_path or adapter.get("base_model_path")
    if not base_path:
        raise ValueError(f"{lora_path}: the adapter names no base checkpoint; give one with --checkpoint_path")
    base = load_checkpoint(base_path)
    block_size = context_length(base, base_path)
    model = adapter_on_base(adapter, base, lora_path, base_path)
    return model, block_size, saved_template(adapter["prompt_template"], lora_path)


def saved_template(saved: dict | None, path: str | Path) -> PromptTemplate | None:
    """The template an adapter or an exported folder stored, or a one-line ValueError naming the file."""
    try:
        return PromptTemplate.from_dict(saved) if saved is not None else None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def load_inference_model(path: str | Path | None, device: str = "cpu", lora_path: str | Path | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[LightGPT, int, PromptTemplate | None]:
    """The model to generate with (checkpoint.load_model's, or with lora_path the adapter merged into its base),
    in eval mode on the device and in dtype, its context length and its prompt template, if it has one."""
    if lora_path is not None:
        model, block_size, template = load_lora_model(lora_path, path)
        return model.to(device, dtype), block_size, template
    model, block_size, template = load_model(path, device, dtype=dtype)
    return model, block_size, saved_template(template, path)
