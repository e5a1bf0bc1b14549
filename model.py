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


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by pre-train.py, loaded safely onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"model_args", "model"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a LightGPT checkpoint (no model_args and model entries)")
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

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The logits of every position and, given targets y, the mean cross entropy over those that are
        not padding. Training with targets returns (None, loss): the output layer and the loss are fused
        so that the logits, the largest tensor of a step, are never stored (see LinearCrossEntropy)."""
        z = self.embedding_dropout(self.token_embeddings(x))
        for block in self.body:
            if self.activation_checkpointing and self.training:
                z = checkpoint(block, z, use_reentrant=False)
            else:
                z = block(z)
        z = self.output_norm(z)
        if y is not None and self.training and torch.is_grad_enabled():
            loss = LinearCrossEntropy.apply(z.flatten(0, 1), self.output_layer.weight, y.flatten(), self.padding_index)
            return None, loss
        logits = self.output_layer(z)
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


class LinearCrossEntropy(torch.autograd.Function):
    """The output layer and the mean cross entropy fused, a chunk of positions at a time.

    The forward pass also computes the gradients with respect to the hidden states and the weight, and
    keeps only those for the backward pass, never the (positions x vocabulary) logits. That saves their
    memory, and on a CPU a quarter of the output layer's time: a chunk's logits stay in the cache and in
    memory the allocator reuses, instead of half a gigabyte of fresh pages every step.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        # Chunks of logits of at most 32 MB measured fastest on a CPU; a GPU wants a few large kernels.
        chunk_size = max(1, (2**23 if device_type == "cpu" else 2**28) // weight.size(0))
        kept = targets != ignore_index
        # d(mean loss)/d(logits) = (softmax - one_hot(target)) * kept / count; the scale is applied to
        # the small hidden-sized factors rather than to the vocabulary-sized chunk.
        scale = (kept / kept.sum()).unsqueeze(1).to(dtype)
        targets = targets.where(kept, 0).unsqueeze(1)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        loss = torch.zeros((), device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, len(hidden), chunk_size):
                rows = slice(start, start + chunk_size)
                log_probabilities = (hidden[rows] @ weight.T).float().log_softmax(-1)
                loss -= (log_probabilities.gather(1, targets[rows]) * scale[rows]).sum()
                minus_one = torch.full(targets[rows].shape, -1.0, device=hidden.device)
                gradient = log_probabilities.exp_().scatter_add_(1, targets[rows], minus_one).to(dtype)
                torch.mul(gradient @ weight, scale[rows], out=grad_hidden[rows])
                grad_weight.addmm_(gradient.T, hidden[rows] * scale[rows])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None
