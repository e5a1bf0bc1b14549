"""The LightGPT model: a bias-free, position-free, weight-tied GPT in pure PyTorch."""

import math
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import (
    GELU,
    Dropout,
    Embedding,
    Linear,
    Module,
    ModuleList,
    Parameter,
    RMSNorm,
    Sequential,
)
from torch.nn.functional import cross_entropy, scaled_dot_product_attention
from torch.utils.checkpoint import checkpoint


def best_device() -> str:
    """The fastest device here: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> None:
    """Raise a one-line ValueError when `device` cannot be used on this machine."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device: {device!r} is not a device name; use cuda, mps or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} was asked for, but no CUDA GPU is available here; use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device: {device!r} was asked for, but MPS is not available here; use cpu")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device: {device!r} is not supported; use cuda, mps or cpu")


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("model_args", "model")) -> dict:
    """A checkpoint written by pre-train.py (or, with other `required` entries, an adapter), loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not set(required) <= checkpoint.keys():
        raise ValueError(f"{path}: not a LightGPT checkpoint of this kind (no {' and '.join(required)} entries)")
    return checkpoint


class LightGPT(Module):
    """A decoder-only Transformer with no biases, no positional embeddings and tied embeddings."""

    def __init__(
        self,
        vocabulary_size: int,
        embedding_dimensions: int,
        num_heads: int,
        num_layers: int,
        feed_forward_ratio: int = 4,
        dropout: float = 0.0,
        padding_index: int = -100,
        eos_index: int = 50256,
    ):
        super().__init__()
        for name, value in (
            ("vocabulary_size", vocabulary_size),
            ("embedding_dimensions", embedding_dimensions),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
            ("feed_forward_ratio", feed_forward_ratio),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if embedding_dimensions % num_heads != 0:
            raise ValueError(
                f"embedding_dimensions ({embedding_dimensions}) must be divisible by num_heads ({num_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= eos_index < vocabulary_size:
            raise ValueError(f"eos_index must be a token id below vocabulary_size ({vocabulary_size}), got {eos_index}")

        self.token_embeddings = Embedding(vocabulary_size, embedding_dimensions)
        self.embedding_dropout = Dropout(dropout)
        self.body = ModuleList(
            CausalSelfAttentionBlock(embedding_dimensions, num_heads, feed_forward_ratio, dropout)
            for _ in range(num_layers)
        )
        self.output_norm = RMSNorm(embedding_dimensions)
        self.output_layer = Linear(embedding_dimensions, vocabulary_size, bias=False)
        self.output_layer.weight = self.token_embeddings.weight

        self.vocabulary_size = vocabulary_size
        self.padding_index = padding_index
        self.eos_index = eos_index
        self.activation_checkpointing = False

        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by the depth.
        residual_std = 0.02 / math.sqrt(2 * num_layers)
        for block in self.body:
            torch.nn.init.normal_(block.attention.output_projection.weight, std=residual_std)
            torch.nn.init.normal_(block.mlp[-2].weight, std=residual_std)

    @staticmethod
    def _init_weights(module: Module) -> None:
        # N(0, 1), Embedding's default, tied to the output layer makes huge logits whose
        # gradients underflow to denormals and slow the CPU tenfold.
        if isinstance(module, (Linear, Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)

    @property
    def num_trainable_params(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(parameter.numel() for parameter in self.parameters() if parameter.requires_grad)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        z = self.embedding_dropout(self.token_embeddings(x))
        for block in self.body:
            if self.activation_checkpointing and self.training:
                z = checkpoint(block, z, use_reentrant=False)
            else:
                z = block(z)
        logits = self.output_layer(self.output_norm(z))
        if y is None:
            return logits, None
        loss = cross_entropy(
            logits.view(-1, logits.size(-1)).float(),
            y.reshape(-1),
            ignore_index=self.padding_index,
        )
        return logits, loss


class CausalSelfAttentionBlock(Module):
    """Pre-norm residual block: attention, then a feed-forward network."""

    def __init__(self, embedding_dimensions: int, num_heads: int, feed_forward_ratio: int, dropout: float):
        super().__init__()
        hidden_dimensions = feed_forward_ratio * embedding_dimensions
        self.attention_norm = RMSNorm(embedding_dimensions)
        self.attention = CausalSelfAttention(embedding_dimensions, num_heads, dropout)
        self.mlp_norm = RMSNorm(embedding_dimensions)
        self.mlp = Sequential(
            Linear(embedding_dimensions, hidden_dimensions, bias=False),
            GELU(),
            Linear(hidden_dimensions, embedding_dimensions, bias=False),
            Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CausalSelfAttention(Module):
    """Multi-head self-attention in which each token sees only itself and the tokens before it."""

    def __init__(self, embedding_dimensions: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dimensions = embedding_dimensions // num_heads
        self.qkv_projection = Linear(embedding_dimensions, 3 * embedding_dimensions, bias=False)
        self.output_projection = Linear(embedding_dimensions, embedding_dimensions, bias=False)
        self.dropout = dropout
        self.output_dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch_size, sequence_length, embedding_dimensions = x.size()
        q, k, v = (
            self.qkv_projection(x)
            .view(batch_size, sequence_length, 3, self.num_heads, self.head_dimensions)
            .permute(2, 0, 3, 1, 4)
        )
        z = scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        z = z.transpose(1, 2).reshape(batch_size, sequence_length, embedding_dimensions)
        return self.output_dropout(self.output_projection(z))


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

    def forward(self, x: Tensor) -> Tensor:
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
    for name, module in list(model.body.named_modules(prefix="body")):
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
    if state.keys() != expected.keys():
        raise ValueError(
            f"the adapter has {len(state)} matrices, the model has {len(expected)}: they were made for "
            f"a model with another number of layers"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"the adapter's {name} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[name].shape)}: it was made for a model of another size or rank"
            )
    model.load_state_dict(state, strict=False)


def load_lora_checkpoint(path: str | Path) -> dict:
    """An adapter checkpoint written by instruction-tune.py, loaded safely onto the CPU."""
    return load_checkpoint(path, required=("lora_args", "model_args", "lora", "prompt_template"))


def check_same_base(lora_checkpoint: dict, base_checkpoint: dict) -> None:
    """Raise a one-line ValueError when the adapter was trained on a base model of another shape."""
    for name in ("vocabulary_size", "embedding_dimensions", "num_heads", "num_layers", "feed_forward_ratio"):
        trained_on, given = lora_checkpoint["model_args"].get(name), base_checkpoint["model_args"].get(name)
        if trained_on != given:
            raise ValueError(
                f"the adapter was trained on a base model with {name}={trained_on}, "
                f"but the base checkpoint has {name}={given}"
            )


def load_adapted_model(lora_checkpoint: dict, base_checkpoint: dict) -> LightGPT:
    """The base model with its adapter applied and merged: a plain LightGPT in eval mode."""
    check_same_base(lora_checkpoint, base_checkpoint)
    model = LightGPT(**base_checkpoint["model_args"])
    model.load_state_dict(base_checkpoint["model"])
    add_lora(model, **lora_checkpoint["lora_args"])
    load_lora_state_dict(model, lora_checkpoint["lora"])
    return merge_lora(model).eval()


def load_lora_model(lora_path: str | Path, base_path: str | Path | None = None) -> tuple[LightGPT, int, dict]:
    """An adapter merged into its base (the checkpoint the adapter names, unless base_path is given), in eval
    mode on the CPU, with the base's context length and the prompt template the adapter was trained with."""
    adapter = load_lora_checkpoint(lora_path)
    base_path = base_path or adapter.get("base_model_path")
    if not base_path:
        raise ValueError(f"{lora_path}: the adapter names no base checkpoint; give one with --checkpoint_path")
    base = load_checkpoint(base_path)
    try:
        model = load_adapted_model(adapter, base)
    except ValueError as error:
        raise ValueError(f"{lora_path} cannot be applied to {base_path}: {error}") from None
    return model, base["block_size"], adapter["prompt_template"]
