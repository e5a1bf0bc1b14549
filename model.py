"""The LightGPT network: a bias-free, position-free, weight-tied GPT in pure PyTorch."""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor
from torch.nn import GELU, Dropout, Embedding, Linear, Module, ModuleList, Parameter, RMSNorm
from torch.nn.functional import cross_entropy, scaled_dot_product_attention
from torch.utils.checkpoint import checkpoint


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


def softmax_cross_entropy_in_place(
    logits: Tensor, targets: Tensor, kept: Tensor, recompute_logits: Callable[[], Tensor]
) -> tuple[Tensor, Tensor]:
    """The summed cross entropy of a chunk of logits over its kept targets, in float32, and its gradient
    softmax - one_hot(target), which overwrites the logits in their own dtype. A CPU's way: its softmax computes
    in float32 inside and writes bf16, where converting the chunk to float32 and back, or scattering into a bf16
    chunk, would copy it whole.

    Args:
        logits: (positions, vocabulary), in the compute dtype.
        targets, kept: (positions, 1), the target ids and whether each counts.
        recompute_logits: the logits again, for the rare chunk in which the probability of a target is below
            float32's range (a loss over 87 on one token), whose loss then comes from the log-softmax.
    """
    probabilities = torch.softmax(logits, -1, out=logits)
    positions, targets = torch.arange(len(targets), device=targets.device), targets.squeeze(1)
    target_probabilities = probabilities[positions, targets]  # (positions,)
    log_probabilities = target_probabilities.float().log()
    if log_probabilities.isneginf().any():
        log_probabilities = recompute_logits().float().log_softmax(-1)[positions, targets]
    probabilities[positions, targets] = target_probabilities - 1
    return -(log_probabilities * kept.squeeze(1)).sum(), probabilities


def logits_chunk_size(hidden: Tensor, weight: Tensor) -> int:
    """The positions in a chunk of logits: chunks of at most 32 MB measured fastest on a CPU; a GPU wants a few large
    kernels."""
    return max(1, (2**23 if hidden.device.type == "cpu" else 2**28) // weight.size(0))


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, gradients: tuple[bool, bool] = (False, False)
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The summed cross entropy of the logits hidden @ weight.T over the targets that are not ignore_index, and
    how many targets those are, a chunk of positions at a time so that the (positions x vocabulary) logits never
    exist whole; with gradients (for hidden, for weight), also the gradients of the sum, chunk by chunk on the way."""
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    chunk_size = logits_chunk_size(hidden, weight)
    kept = (targets != ignore_index).unsqueeze(1)
    # d(summed loss)/d(logits) = (softmax - one_hot(target)) * kept; the mask is applied to the small hidden-sized
    # factors rather than to the vocabulary-sized chunk. Dividing by the count is left to the caller, in float32:
    # in fp16 the quotients of a large batch would underflow.
    mask = kept.to(dtype)
    targets = targets.unsqueeze(1).where(kept, 0)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    loss = torch.zeros((), device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if gradients[0] else None
    # Summed over the chunks in float32 whatever the compute dtype: in bf16 the later chunks' contributions would
    # be rounded against the running sum, an error that grows with the number of chunks.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if gradients[1] else None
    with torch.autocast(device_type, enabled=False):
        for start in range(0, len(hidden), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.T  # (chunk, vocabulary)
            if device_type == "cpu":
                chunk_loss, gradient = softmax_cross_entropy_in_place(logits, targets[rows], kept[rows],
                                                                      lambda: hidden[rows] @ weight.T)
                loss += chunk_loss
                if not any(gradients):
                    continue
            else:  # measured on CPUs only
                log_probabilities = logits.float().log_softmax(-1)
                loss -= (log_probabilities.gather(1, targets[rows]) * kept[rows]).sum()
                if not any(gradients):
                    continue
                minus_one = torch.full(targets[rows].shape, -1.0, device=hidden.device)
                gradient = log_probabilities.exp_().scatter_add_(1, targets[rows], minus_one).to(dtype)
            if grad_hidden is not None:
                torch.mul(gradient @ weight, mask[rows], out=grad_hidden[rows])
            if grad_weight is not None and dtype == torch.float32:
                grad_weight.addmm_(gradient.T, hidden[rows] * mask[rows])
            elif grad_weight is not None:  # addmm_ wants one dtype: the chunk's product is added to the float32 sum
                grad_weight += gradient.T @ (hidden[rows] * mask[rows])
    return loss, kept.sum(), grad_hidden, grad_weight


def linear_token_losses(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The cross entropy of the logits hidden @ weight.T at each position (0 where the target is ignore_index) and
    whether the target is the most likely token there, in float32, a chunk of positions at a time as in
    linear_cross_entropy: what scoring continuations needs, one loss per token, never the whole logits."""
    chunk_size = logits_chunk_size(hidden, weight)
    losses = torch.empty(len(hidden), device=hidden.device)
    most_likely = torch.empty(len(hidden), dtype=torch.bool, device=hidden.device)
    for start in range(0, len(hidden), chunk_size):
        rows = slice(start, start + chunk_size)
        logits = (hidden[rows] @ weight.T).float()  # (chunk, vocabulary)
        losses[rows] = cross_entropy(logits, targets[rows], ignore_index=ignore_index, reduction="none")
        most_likely[rows] = logits.argmax(-1) == targets[rows]
    return losses, most_likely


class LinearCrossEntropy(torch.autograd.Function):
    """The output layer and the mean cross entropy fused (linear_cross_entropy), for training.

    The forward pass also computes the gradients with respect to the hidden states and the weight, and
    keeps only those for the backward pass, never the (positions x vocabulary) logits. That saves their
    memory, and on a CPU a quarter of the output layer's time: a chunk's logits stay in the cache and in
    memory the allocator reuses, instead of half a gigabyte of fresh pages every step.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        # The weight's gradient is skipped when it is frozen, as under LoRA.
        loss, count, grad_hidden, grad_weight = linear_cross_entropy(hidden, weight, targets, ignore_index,
                                                                     (True, ctx.needs_input_grad[1]))
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        factor = grad_loss / count
        return grad_hidden.float() * factor, grad_weight * factor if ctx.needs_input_grad[1] else None, None, None


class RowCrossEntropy(torch.autograd.Function):
    """The summed cross entropy of each row's targets (row_cross_entropy), for training: as in LinearCrossEntropy,
    the forward pass computes the gradient with respect to the hidden states, the backward pass scales it by each
    row's own gradient. The output layer must be frozen (as under LoRA): its weight gets no gradient here."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        if ctx.needs_input_grad[1]:
            raise ValueError("per-row losses train only with a frozen output layer (as under LoRA)")
        losses, grad_hidden = row_cross_entropy(hidden, weight, targets, ignore_index, gradient=True)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: Tensor) -> tuple[Tensor, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden.float() * grad_losses[:, None, None], None, None, None


def row_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, gradient: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """The float32 cross entropy of the logits hidden @ weight.T summed over each row's targets that are not
    ignore_index, (batch,), and with gradient its gradient with respect to hidden (batch, sequence, embedding).
    Only the positions with a target reach the output layer (linear_cross_entropy, chunked): a response's score
    never computes its prompt's logits."""
    losses = torch.zeros(len(hidden), device=hidden.device)
    grad_hidden = None
    for row, (row_hidden, row_targets) in enumerate(zip(hidden, targets)):
        kept = row_targets != ignore_index  # (sequence,)
        losses[row], _, row_gradient, _ = linear_cross_entropy(row_hidden[kept], weight, row_targets[kept],
                                                               ignore_index, (gradient, False))
        if gradient:
            if grad_hidden is None:
                grad_hidden = hidden.new_zeros(hidden.shape, dtype=row_gradient.dtype)
            grad_hidden[row, kept] = row_gradient
    return losses, grad_hidden


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
        """Draw every parameter afresh (init_parameter), one at a time in model order."""
        for name, parameter in self.named_parameters():
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


def blocks_once_named_body(model: Module, state: dict, prefix: str, *_) -> None:
    """Load weights saved when the blocks were named body (exported folders have no format version to upgrade)."""
    for name in [name for name in state if name.startswith(f"{prefix}body.")]:
        state[f"{prefix}blocks.{name.removeprefix(f'{prefix}body.')}"] = state.pop(name)


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
