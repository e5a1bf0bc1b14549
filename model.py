"""The LightGPT network: a bias-free, position-free, weight-tied GPT in pure PyTorch."""

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor
from torch.nn import GELU, Dropout, Embedding, Linear, Module, ModuleList, RMSNorm
from torch.nn.functional import scaled_dot_product_attention
from torch.utils.checkpoint import checkpoint

from losses import LinearCrossEntropy, RowCrossEntropy, linear_cross_entropy, linear_token_losses, row_cross_entropy


# The metadata of the LightGPTConfig fields that set the weights' shapes: a base and its adapter must agree on them.
SHAPE = {"shape": True}


@dataclass
class LightGPTConfig:
    """The shape of a LightGPT; checkpoints store it as their model_args."""

    vocabulary_size: int = field(metadata=SHAPE)
    embedding_dimensions: int = field(metadata=SHAPE)
    num_heads: int = field(metadata=SHAPE)
    num_layers: int = field(metadata=SHAPE)
    feed_forward_ratio: int = field(default=4, metadata=SHAPE)
    dropout: float = 0.0
    padding_index: int = -100
    eos_index: int = 50256
    # Each key/value head is shared by num_heads / num_kv_heads query heads; None (checkpoints from before
    # grouped-query attention): num_heads.
    num_kv_heads: int | None = field(default=None, metadata=SHAPE)

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # a bool is an int to isinstance
                raise ValueError(f"{name} must be a whole number of at least 1, got {described(value)}")
        for name in ("padding_index", "eos_index"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"{name} must be a whole number, got {described(getattr(self, name))}")
        if type(self.dropout) not in (int, float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {described(self.dropout)}")
        if self.embedding_dimensions % self.num_heads != 0:
            raise ValueError(f"embedding_dimensions ({self.embedding_dimensions}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if not 0 <= self.eos_index < self.vocabulary_size:
            raise ValueError(f"eos_index must be a token id below vocabulary_size ({self.vocabulary_size}), "
                             f"got {self.eos_index}")

    @property
    def head_dimensions(self) -> int:
        return self.embedding_dimensions // self.num_heads


# The names of those fields, each a count of at least 1.
SHAPE_FIELDS = tuple(config_field.name for config_field in fields(LightGPTConfig) if config_field.metadata.get("shape"))


def described(value) -> str:
    """A value as a message should name it: its repr and, where that could be mistaken, its type ('"1" (a str)')."""
    return repr(value) if value is None or type(value) in (int, float) else f"{value!r} (a {type(value).__name__})"


class KVCache:
    """One attention layer's keys and values for the tokens seen so far, in buffers allocated once."""

    def __init__(self, batch_size: int, num_heads: int, capacity: int, head_dimensions: int, like: Tensor):
        """Buffers on the device and in the dtype of `like` (the model's weights)."""
        self.keys = like.new_empty(batch_size, num_heads, capacity, head_dimensions)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store the keys and values of new tokens; return those of every token so far, and which of them each
        new token sees (None: the causal rule, or all of them for a single new token)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.keys.size(2):
            raise ValueError(f"the cache holds {self.keys.size(2)} tokens; {end} do not fit")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        mask = None
        if start and k.size(2) > 1:
            # The new tokens see every cached one, and each other only up to themselves.
            mask = torch.ones(k.size(2), end, dtype=torch.bool, device=k.device).tril(start)
        return self.keys[:, :, :end], self.values[:, :, :end], mask

    def reorder(self, rows: Tensor) -> None:
        """Keep the cached sequences at `rows`, in that order (the beams that survive a beam search step)."""
        self.keys, self.values = (self._select(buffer, rows) for buffer in (self.keys, self.values))

    def _select(self, buffer: Tensor, rows: Tensor) -> Tensor:
        selected = buffer.new_empty(len(rows), *buffer.shape[1:])
        selected[:, :, : self.length] = buffer[rows, :, : self.length]  # copy only the filled part
        return selected


def attention(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
    """scaled_dot_product_attention; in float32 under a CPU's autocast for sequences under 512 tokens, where the
    CPU's bf16 kernel works in blocks too small to pay and trains slower than float32 (docs/performance.md)."""
    device_type = q.device.type
    if device_type != "cpu" or not torch.is_autocast_enabled(device_type) or q.size(-2) >= 512:
        return scaled_dot_product_attention(q, k, v, **options)
    with torch.autocast(device_type, enabled=False):  # autocast would cast float32 inputs back
        return scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)


class CausalSelfAttention(Module):
    """Multi-head self-attention in which each token sees only itself and the tokens before it."""

    def __init__(self, config: LightGPTConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dimensions = config.head_dimensions
        # The queries, then the keys, then the values: with num_kv_heads = num_heads, the layout of 3 x embedding.
        self.qkv_widths = [head_count * config.head_dimensions for head_count in
                           (config.num_heads, config.num_kv_heads, config.num_kv_heads)]
        self.qkv_projection = Linear(config.embedding_dimensions, sum(self.qkv_widths), bias=False)
        self.output_projection = Linear(config.embedding_dimensions, config.embedding_dimensions, bias=False)
        self.dropout = config.dropout
        self.output_dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        batch_size, sequence_length, embedding_dimensions = x.size()
        q, k, v = self.qkv_projection(x).split(self.qkv_widths, -1)  # (batch, sequence, heads or kv_heads * head_dim.)
        q = q.view(batch_size, sequence_length, self.num_heads, self.head_dimensions).transpose(1, 2)
        # q: (batch, heads, sequence, head_dimensions); k and v: (batch, kv_heads, sequence, head_dimensions)
        k, v = (t.view(batch_size, sequence_length, self.num_kv_heads, self.head_dimensions).transpose(1, 2)
                for t in (k, v))
        mask, is_causal = None, True
        if cache is not None:
            k, v, mask = cache.append(k, v)  # (batch, kv_heads, cached + sequence, head_dimensions)
            is_causal = mask is None and k.size(2) == sequence_length  # nothing was cached before these tokens
        attended = attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (batch, heads, sequence, head_dimensions)
        # (batch, sequence, embedding)
        attended = attended.transpose(1, 2).reshape(batch_size, sequence_length, embedding_dimensions)
        return self.output_dropout(self.output_projection(attended))


class MLP(Module):
    """The feed-forward network of a block: widen, GELU, narrow back."""

    def __init__(self, config: LightGPTConfig):
        super().__init__()
        hidden_dimensions = config.feed_forward_ratio * config.embedding_dimensions
        self.up_projection = Linear(config.embedding_dimensions, hidden_dimensions, bias=False)
        self.activation = GELU()
        self.down_projection = Linear(hidden_dimensions, config.embedding_dimensions, bias=False)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_projection(self.activation(self.up_projection(x))))


class CausalSelfAttentionBlock(Module):
    """Pre-norm residual block: attention, then a feed-forward network."""

    def __init__(self, config: LightGPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.embedding_dimensions)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.embedding_dimensions)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class LightGPT(Module, PyTorchModelHubMixin, library_name="lightgpt", pipeline_tag="text-generation"):
    """A decoder-only Transformer with no biases, no positional embeddings and tied embeddings.

    LightGPT.from_pretrained(folder or Hub id) and model.push_to_hub(repo_id) come from huggingface_hub's mixin:
    the weights in model.safetensors (the tied matrix once), the LightGPTConfig in config.json.
    """

    def __init__(self, config: LightGPTConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocabulary_size, config.embedding_dimensions)
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = ModuleList(CausalSelfAttentionBlock(config) for _ in range(config.num_layers))
        self.output_norm = RMSNorm(config.embedding_dimensions)
        self.output_layer = Linear(config.embedding_dimensions, config.vocabulary_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False
        self.init_weights()
        self.register_load_state_dict_pre_hook(blocks_once_named_body)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs) -> "LightGPT":
        """The mixin's loading, except that a weight missing from the file is an error, not a random layer."""
        return super()._from_pretrained(strict=strict, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's saving, with the weights file as readable as any other this process writes: safetensors
        writes it 0600 whatever the umask."""
        super()._save_pretrained(save_directory)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(Path(save_directory) / "model.safetensors", 0o666 & ~umask)

    def tie_weights(self) -> None:
        """One matrix for the embedding and the output layer, again after whatever makes parameters anew
        (to_empty, load_state_dict with assign=True)."""
        self.output_layer.weight = self.token_embeddings.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> "LightGPT":
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @property
    def vocabulary_size(self) -> int:
        return self.config.vocabulary_size

    @property
    def padding_index(self) -> int:
        return self.config.padding_index

    @property
    def eos_index(self) -> int:
        return self.config.eos_index

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter afresh (init_parameter), one at a time in model order; on the meta device there is
        nothing to draw (distributed.materialize draws them once allocated), and drawing takes milliseconds each."""
        for name, parameter in self.named_parameters():
            if not parameter.is_meta:
                self.init_parameter(name, parameter)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: Tensor) -> None:
        """Fill `tensor`, the parameter `name` or a tensor of its shape, as the model starts. GPT-2's
        initialisation: N(0, 0.02) for every matrix, and the projections that write into the residual stream
        scaled down by the depth; RMSNorm's weights at one. N(0, 1), Embedding's default, tied to the output
        layer would make huge logits whose gradients underflow to denormals and slow the CPU tenfold."""
        if isinstance(self.get_submodule(name.rpartition(".")[0]), RMSNorm):
            torch.nn.init.ones_(tensor)
        elif name.endswith(("attention.output_projection.weight", "mlp.down_projection.weight")):
            torch.nn.init.normal_(tensor, std=0.02 / math.sqrt(2 * self.config.num_layers))
        else:
            torch.nn.init.normal_(tensor, std=0.02)

    @property
    def num_trainable_params(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(parameter.numel() for parameter in self.parameters() if parameter.requires_grad)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def forward(self, x: Tensor, y: Tensor | None = None, per_row: bool = False
                ) -> tuple[Tensor | None, Tensor | None]:
        """Without targets, (the logits of every position, None). With targets y, (None, the mean cross entropy
        over those that are not padding): the output layer and the loss are fused so that the logits, the
        largest tensor of a step, never exist whole, in training (LinearCrossEntropy) as in evaluation. With
        per_row, (None, each row's summed cross entropy, (batch,)): minus the log-probability of its targets."""
        hidden = self.hidden_states(x)  # (batch, sequence, embedding)
        if y is None:
            return self.output_layer(hidden), None
        if per_row and torch.is_grad_enabled():
            return None, RowCrossEntropy.apply(hidden, self.output_layer.weight, y, self.padding_index)
        if per_row:
            return None, row_cross_entropy(hidden, self.output_layer.weight, y, self.padding_index)[0]
        # (batch x sequence, embedding), (vocabulary, embedding), (batch x sequence,)
        hidden, weight, targets = hidden.flatten(0, 1), self.output_layer.weight, y.flatten()
        if torch.is_grad_enabled():
            return None, LinearCrossEntropy.apply(hidden, weight, targets, self.padding_index)
        loss, count, _, _ = linear_cross_entropy(hidden, weight, targets, self.padding_index)
        return None, loss / count

    def hidden_states(self, x: Tensor) -> Tensor:
        """What the output layer reads: the normalised last hidden state of every position, (batch, sequence,
        embedding)."""
        hidden = self.embedding_dropout(self.token_embeddings(x))  # (batch, sequence, embedding)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                hidden = checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = block(hidden)
        return self.output_norm(hidden)

    def token_losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The float32 cross entropy of each target of y, (batch, sequence), 0 at padding, and whether each target
        is the most likely next token (linear_token_losses). Only the positions with a target reach the output
        layer, the largest product: scoring a continuation skips its context's logits."""
        kept = y != self.padding_index
        hidden = self.hidden_states(x)[kept]  # (targets, embedding)
        losses, most_likely = linear_token_losses(hidden, self.output_layer.weight, y[kept], self.padding_index)
        all_losses = torch.zeros(y.shape, device=y.device).masked_scatter_(kept, losses)
        return all_losses, torch.ones_like(kept).masked_scatter_(kept, most_likely)

    def new_cache(self, batch_size: int, capacity: int) -> list[KVCache]:
        """An empty key/value cache, one per layer, for batch_size sequences of up to capacity tokens."""
        weights = self.token_embeddings.weight
        return [
            KVCache(batch_size, self.config.num_kv_heads, capacity, self.config.head_dimensions, weights)
            for _ in self.blocks
        ]

    def next_token_logits(self, x: Tensor, cache: list[KVCache] | None = None) -> Tensor:
        """The float32 logits of the token that follows each row of x, whatever the weights' dtype. With a cache, x
        continues the tokens cached so far, and its keys and values join them; without one, x is the whole context."""
        hidden = self.token_embeddings(x)
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, cache[index] if cache is not None else None)
        return self.output_layer(self.output_norm(hidden[:, -1])).float()


def blocks_once_named_body(model: Module, state: dict, prefix: str, *_) -> None:
    """Load weights saved when the blocks were named body (exported folders have no format version to upgrade)."""
    for name in [name for name in state if name.startswith(f"{prefix}body.")]:
        state[f"{prefix}blocks.{name.removeprefix(f'{prefix}body.')}"] = state.pop(name)


