"""LoRA: frozen weights plus trainable low-rank updates, and the rows a fine-tuning adds to the vocabulary."""

import math

import torch
from torch import Tensor
from torch.nn import Dropout, Linear, Module, Parameter

from model import LightGPT


class LoRALinear(Module):
    """A frozen Linear layer plus a trainable low-rank update: W x + alpha * B A dropout(x).

    B starts at zero, so a fresh adapter changes nothing; A starts as N(0, 1/in_features).
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        weight = base.weight
        self.lora_a = Parameter(
            torch.randn(rank, base.in_features, device=weight.device, dtype=weight.dtype) / math.sqrt(base.in_features)
        )
        self.lora_b = Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        self.alpha = alpha
        self.dropout = Dropout(dropout)
        self.enabled = True  # off: the base layer alone (finetuning.adapters_off)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.alpha * (self.dropout(x) @ self.lora_a.T @ self.lora_b.T)

    @torch.no_grad()
    def merged(self) -> Linear:
        """A plain Linear layer whose weight is W + alpha * B @ A: the same outputs, no extra work."""
        weight = self.base.weight
        linear = Linear(self.base.in_features, self.base.out_features, bias=False, device=weight.device,
                        dtype=weight.dtype)
        linear.weight.copy_(weight + self.alpha * (self.lora_b @ self.lora_a))
        return linear


def lora_layers(model: LightGPT) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def replace_module(model: Module, name: str, module: Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def add_lora(model: LightGPT, rank: int, alpha: float, dropout: float) -> None:
    """Freeze every parameter, then give each block's attention and MLP weight matrices a LoRA adapter."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    for name, module in list(model.blocks.named_modules(prefix="blocks")):
        if isinstance(module, Linear):
            replace_module(model, name, LoRALinear(module, rank, alpha, dropout))


def merge_lora(model: LightGPT) -> LightGPT:
    """Fold every adapter into its base weight, leaving a plain LightGPT for inference."""
    for name, layer in lora_layers(model).items():
        replace_module(model, name, layer.merged())
    return model


def lora_state_dict(model: LightGPT) -> dict[str, Tensor]:
    """Only the adapters' A and B matrices: all that instruction tuning changes."""
    return {
        name: tensor for name, tensor in model.state_dict().items() if name.endswith((".lora_a", ".lora_b"))
    }


def load_lora_state_dict(model: LightGPT, state: dict[str, Tensor]) -> None:
    """Copy saved adapters into a model that has adapters of the same rank on a base of the same size."""
    expected = lora_state_dict(model)
    if len(state) != len(expected):
        raise ValueError(
            f"the adapter has {len(state)} matrices, the model has {len(expected)}: they were made for "
            f"a model with another number of layers"
        )
    if state.keys() != expected.keys():
        raise ValueError(f"the adapter's {sorted(state.keys() - expected.keys())[0]} is not one of this model's "
                         f"adapter matrices")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"the adapter's {name} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[name].shape)}: it was made for a model of another size or rank"
            )
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def grow_vocabulary(model: LightGPT, vocabulary_size: int, rows: Tensor | None = None) -> None:
    """Add rows to the tied embedding for tokens after the model's vocabulary: the given rows (an adapter's), else
    rows drawn as the embedding's own were."""
    weight = model.token_embeddings.weight
    if rows is None:
        rows = weight.new_empty(vocabulary_size - len(weight), weight.size(1))
        model.init_parameter("token_embeddings.weight", rows)
    if len(weight) + len(rows) != vocabulary_size or rows.size(1) != weight.size(1):
        raise ValueError(f"the added embedding rows have shape {tuple(rows.shape)}; a vocabulary of "
                         f"{vocabulary_size} on {len(weight)} tokens of width {weight.size(1)} needs "
                         f"({vocabulary_size - len(weight)}, {weight.size(1)})")
    grown = Parameter(torch.cat((weight, rows.to(weight))), requires_grad=weight.requires_grad)  # (vocabulary, width)
    model.token_embeddings.weight = grown
    model.token_embeddings.num_embeddings = model.output_layer.out_features = vocabulary_size
    model.config.vocabulary_size = vocabulary_size
    model.tie_weights()


def train_added_rows(model: LightGPT, first: int) -> Parameter:
    """Make the embedding rows from `first` on trainable, and only those: the gradient of the rows before is
    zeroed as it is computed (so Adam never moves them; give this parameter no weight decay). The parameter."""
    weight = model.token_embeddings.weight.requires_grad_(True)
    frozen = torch.arange(len(weight), device=weight.device)[:, None] < first  # (vocabulary, 1)
    weight.register_hook(lambda gradient: gradient.masked_fill(frozen, 0))
    return weight


def added_rows(model: LightGPT, first: int) -> Tensor:
    """The embedding rows from `first` on, as an adapter saves them."""
    return model.token_embeddings.weight[first:].detach().clone()
