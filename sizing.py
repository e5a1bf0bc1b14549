"""Memory and compute for training a LightGPT: the arithmetic behind model_sizing.ipynb.

Plain Python, no torch: the notebook and the tests call these functions, and the tests check them against
what PyTorch really counts and stores. Memory is in bytes, per device, for eager (not compiled) training.
"""

import math
from dataclasses import dataclass

FP32_BYTES = 4
BF16_BYTES = 2
INDEX_BYTES = 8  # token ids and targets are int64
LOSS_CHUNK_ELEMENTS = 2**28  # the fused loss's logits per chunk on a GPU (losses.LinearCrossEntropy)
OPTIMIZERS = ("adafactor", "adamw")
SHARDING_LEVELS = (0, 2, 3)


def parameter_shapes(
    vocabulary_size: int, embedding_dimensions: int, num_layers: int, feed_forward_ratio: int = 4,
    key_value_dimensions: int | None = None,
) -> list[tuple[int, ...]]:
    """The shape of every trainable tensor in model order, the tied embedding and output layer once.

    key_value_dimensions: the width of the keys (and of the values), num_kv_heads * head_dimensions; by default
    embedding_dimensions, one key/value head per query head. Grouped-query attention narrows the projection.
    """
    hidden_dimensions = feed_forward_ratio * embedding_dimensions
    qkv_dimensions = embedding_dimensions + 2 * (key_value_dimensions or embedding_dimensions)
    block = [
        (embedding_dimensions,),  # attention RMSNorm
        (qkv_dimensions, embedding_dimensions),  # query, key and value projection
        (embedding_dimensions, embedding_dimensions),  # output projection
        (embedding_dimensions,),  # MLP RMSNorm
        (hidden_dimensions, embedding_dimensions),
        (embedding_dimensions, hidden_dimensions),
    ]
    return [(vocabulary_size, embedding_dimensions)] + block * num_layers + [(embedding_dimensions,)]


def parameter_counts(
    vocabulary_size: int, embedding_dimensions: int, num_layers: int, feed_forward_ratio: int = 4,
    key_value_dimensions: int | None = None,
) -> dict[str, int]:
    """Trainable parameters: total, embedding (tied to the output layer, counted once), non-embedding, per block.
    key_value_dimensions: as in parameter_shapes."""
    embedding = vocabulary_size * embedding_dimensions
    per_block = (_block_matrix_parameters(embedding_dimensions, feed_forward_ratio, key_value_dimensions)
                 + 2 * embedding_dimensions)
    non_embedding = num_layers * per_block + embedding_dimensions
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "per_block": per_block,
    }


def training_flops_per_token(
    vocabulary_size: int,
    block_size: int,
    embedding_dimensions: int,
    num_layers: int,
    feed_forward_ratio: int = 4,
    key_value_dimensions: int | None = None,
) -> float:
    """Forward and backward FLOPs per trained token: 6N plus the attention term 12 * layers * block_size * width.

    6N counts a multiply and an add for every parameter once forward and twice backward; the tied embedding is
    in N because the output layer is a real matrix multiplication. The attention term (the scores Q K^T and
    their product with V, forward and backward) assumes FULL attention over the whole block and does not halve
    for the causal mask, like PaLM's MFU and like FlopCounterMode: it counts the full T x T products of the math
    backend (`sdpa_kernel(SDPBackend.MATH)`) and of the CUDA flash, efficient and cuDNN kernels. On the CPU the
    default SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula, so there
    FlopCounterMode counts no attention at all and reports only about 6N per token. Grouped-query attention
    (key_value_dimensions, as in parameter_shapes) shrinks N but not the attention term: every query head still
    scores every token's key.
    """
    total = parameter_counts(vocabulary_size, embedding_dimensions, num_layers, feed_forward_ratio,
                             key_value_dimensions)["total"]
    return 6 * total + 12 * num_layers * block_size * embedding_dimensions


def training_flops(flops_per_token: float, tokens: float) -> float:
    """FLOPs to train on a budget of tokens."""
    return flops_per_token * tokens


def training_seconds(total_flops: float, peak_flops_per_second: float, mfu: float, world_size: int = 1) -> float:
    """Wall-clock seconds on `world_size` accelerators that each reach a model-FLOPs utilization of `mfu`.

    Model FLOPs exclude activation checkpointing's recomputation: checkpointing lowers the MFU you reach.
    """
    return total_flops / (peak_flops_per_second * mfu * world_size)


def optimizer_state_bytes(shapes: list[tuple[int, ...]], optimizer: str, shards: int = 1) -> float:
    """The optimizer state for these parameters, each sharded along its first dimension over `shards` devices.

    AdamW keeps two fp32 moments per parameter. torch.optim.Adafactor keeps, for a matrix, one fp32 factor per
    row and one per column (rows shard with the matrix, columns do not) and, for a vector, a full fp32 second
    moment. Both keep a step counter per tensor.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    state = 0.0
    for shape in shapes:
        numel = math.prod(shape)
        if optimizer == "adamw":
            state += 2 * numel / shards
        elif len(shape) >= 2:
            state += numel / shape[-1] / shards + shape[-1]
        else:
            state += numel / shards
    return FP32_BYTES * (state + len(shapes))


@dataclass(frozen=True)
class Architecture:
    """A LightGPT's shape and context, in the names of model.LightGPTConfig."""

    vocabulary_size: int
    block_size: int
    embedding_dimensions: int
    num_heads: int
    num_layers: int
    feed_forward_ratio: int = 4
    num_kv_heads: int | None = None  # None: num_heads

    @property
    def key_value_dimensions(self) -> int:
        """The width of the keys (and of the values): each key/value head's head_dimensions."""
        return (self.num_kv_heads or self.num_heads) * (self.embedding_dimensions // self.num_heads)

    @property
    def parameters(self) -> dict[str, int]:
        return parameter_counts(self.vocabulary_size, self.embedding_dimensions, self.num_layers,
                                self.feed_forward_ratio, self.key_value_dimensions)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return parameter_shapes(self.vocabulary_size, self.embedding_dimensions, self.num_layers,
                                self.feed_forward_ratio, self.key_value_dimensions)

    @property
    def block_matrix_parameters(self) -> int:
        return _block_matrix_parameters(self.embedding_dimensions, self.feed_forward_ratio, self.key_value_dimensions)

    def kv_cache_bytes(self, sequences: int, capacity: int | None = None, element_bytes: int = FP32_BYTES) -> float:
        """kv_cache_bytes of this architecture, for sequences of up to capacity tokens (by default block_size)."""
        return kv_cache_bytes(self.num_layers, self.embedding_dimensions, self.num_heads,
                              self.num_kv_heads or self.num_heads, sequences, capacity or self.block_size,
                              element_bytes)

    @property
    def flops_per_token(self) -> float:
        return training_flops_per_token(self.vocabulary_size, self.block_size, self.embedding_dimensions,
                                        self.num_layers, self.feed_forward_ratio, self.key_value_dimensions)


def activation_bytes(
    architecture: Architecture, batch_size: int, mixed_precision: bool, activation_checkpointing: bool
) -> float:
    """Bytes that autograd saves in one forward pass for the backward, with dropout 0.

    With activation checkpointing each block saves only its input; its other activations come back, one block
    at a time, in the backward pass (see `activation_peak_bytes`). With bf16 autocast the matrix products'
    inputs and outputs are bf16 while the residual stream, RMSNorm's statistics and the loss stay fp32, and
    the backward keeps autocast's bf16 copies of the weights it multiplies by.
    """
    width, layers = architecture.embedding_dimensions, architecture.num_layers
    matmul_bytes = BF16_BYTES if mixed_precision else FP32_BYTES
    if activation_checkpointing:
        blocks = layers * FP32_BYTES * width
    else:
        blocks = layers * _block_bytes_per_token(architecture, mixed_precision)
    # The fused output layer and loss (losses.LinearCrossEntropy) keep only their gradients with respect to the
    # normalised hidden states and to the tied weight, never the logits.
    output = _rms_norm_bytes_per_token(width) + matmul_bytes * width
    tokens = batch_size * architecture.block_size
    saved = tokens * (INDEX_BYTES + blocks + output) + matmul_bytes * architecture.parameters["embedding"]
    if mixed_precision and not activation_checkpointing:
        saved += BF16_BYTES * layers * architecture.block_matrix_parameters
    return saved


def activation_peak_bytes(
    architecture: Architecture, batch_size: int, mixed_precision: bool, activation_checkpointing: bool
) -> float:
    """The most activation memory a training step holds: the saved activations plus the largest transient.

    The fused loss holds one chunk of fp32 log-probabilities (and under autocast their bf16 gradient) at a time,
    and the backward starts by scaling its saved gradients. With checkpointing the backward later recomputes
    one block's activations at a time, and under autocast the forward pass caches bf16 copies of every block's
    weights until it ends.
    """
    saved = activation_bytes(architecture, batch_size, mixed_precision, activation_checkpointing)
    tokens = batch_size * architecture.block_size
    vocabulary, width = architecture.vocabulary_size, architecture.embedding_dimensions
    matmul_bytes = BF16_BYTES if mixed_precision else FP32_BYTES
    chunk_rows = min(tokens, LOSS_CHUNK_ELEMENTS // vocabulary)
    chunk = chunk_rows * vocabulary * (FP32_BYTES + (BF16_BYTES if mixed_precision else 0))
    transient = max(chunk, matmul_bytes * (vocabulary + tokens) * width)
    if activation_checkpointing:
        transient = max(transient, tokens * _block_bytes_per_token(architecture, mixed_precision))
        if mixed_precision:
            cached_weights = architecture.num_layers * architecture.block_matrix_parameters
            transient = max(transient, BF16_BYTES * cached_weights)
    return saved + transient


def memory_per_device(
    architecture: Architecture,
    batch_size: int = 1,
    mixed_precision: bool = False,
    optimizer: str = "adafactor",
    activation_checkpointing: bool = False,
    ddp_sharding_level: int = 0,
    world_size: int = 1,
    micro_batches: int = 1,
) -> dict[str, float]:
    """Peak training memory on each device, in bytes, by component, and their total.

    Parameters and gradients are fp32; autocast's bf16 copies of the weights count as activations.
    ddp_sharding_level 0 replicates everything (DDP). 2 (FSDP2, reshard_after_forward=False) shards gradients
    and optimizer state, while the full parameters, gathered in the forward pass, stay beside their shards
    until the backward ends. 3 shards the parameters too and gathers only the root's (the tied embedding and
    final norm) and one block's at a time. Under FSDP the full gradients of one unit (the root or a block)
    exist until they are reduce-scattered. micro_batches is the forward passes each device runs per optimizer
    step: with more than one, level 2 keeps the whole gradients until the last (it saves the collectives, as
    distributed.REDUCE_EVERY_MICRO_BATCH says), while level 3 reduces them after every one. Not counted: the CUDA
    context, allocator fragmentation, communication buffers, DDP's gradient buckets, and what torch.compile saves
    by fusing. One device (world_size 1, no torchrun) shards and gathers nothing, whatever the level.
    """
    if ddp_sharding_level not in SHARDING_LEVELS:
        raise ValueError(f"ddp_sharding_level must be one of {SHARDING_LEVELS}, got {ddp_sharding_level}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    counts = architecture.parameters
    total = counts["total"]
    shards = 1 if ddp_sharding_level == 0 else world_size
    if shards == 1:
        parameters, gradients = total, total
    else:
        largest_unit = max(counts["embedding"], counts["per_block"])
        gradients = total / shards + largest_unit
        if ddp_sharding_level == 2 and micro_batches > 1:
            gradients = total + largest_unit  # whole until the last micro-batch reduces them, unit by unit
        if ddp_sharding_level == 2:
            parameters = total / shards + total
        else:
            parameters = total / shards + counts["embedding"] + architecture.embedding_dimensions + counts["per_block"]
    memory = {
        "parameters": FP32_BYTES * parameters,
        "gradients": FP32_BYTES * gradients,
        "optimizer_state": _optimizer_state_bytes(architecture, optimizer, shards),
        "activations": activation_peak_bytes(architecture, batch_size, mixed_precision, activation_checkpointing),
    }
    memory["total"] = sum(memory.values())
    return memory


def kv_cache_bytes(
    num_layers: int, embedding_dimensions: int, num_heads: int, num_kv_heads: int, sequences: int, capacity: int,
    element_bytes: int = FP32_BYTES,
) -> float:
    """The key/value cache of `sequences` concurrent sequences of up to `capacity` tokens: in every layer, a key
    and a value of head_dimensions for each key/value head and token. Grouped-query attention (num_kv_heads below
    num_heads) divides it by num_heads / num_kv_heads."""
    head_dimensions = embedding_dimensions // num_heads
    return 2 * num_layers * sequences * num_kv_heads * capacity * head_dimensions * element_bytes


def beam_search_bytes(
    vocabulary_size: int, embedding_dimensions: int, num_layers: int, block_size: int, beam_width: int,
    max_tokens: int, prompt_length: int = 1,
) -> float:
    """The most memory a beam search holds besides the model's weights: the beams' fp32 key/value cache of up to
    block_size tokens and their int64 token sequences (two copies while they grow), plus the larger of two
    transients: each step's scores of every beam's every next token (four fp32 copies: the logits, their
    log-softmax, the running totals and what top-k sorts), or the cache's copies while it is reordered for the
    surviving beams (a layer at a time: 1.5 layers' worth) or rebuilt (all of it)."""
    capacity = min(block_size, prompt_length + max_tokens)
    cache = kv_cache_bytes(num_layers, embedding_dimensions, 1, 1, beam_width, capacity)
    sequences = 2 * INDEX_BYTES * beam_width * max_tokens
    scores = 4 * FP32_BYTES * beam_width * vocabulary_size
    cache_copies = cache if prompt_length + max_tokens > block_size else 1.5 * cache / num_layers
    return cache + sequences + max(scores, cache_copies)


def gigabytes(size: float) -> str:
    gb = size / 1e9
    return f"{gb:,.1f} GB" if gb < 1e6 else f"{gb:.1e} GB"


def fits(memory: dict[str, float], device_memory_bytes: float, headroom: float = 0.1) -> bool:
    """Whether the total fits in the device's memory with a fraction to spare for what the estimate leaves out."""
    return memory["total"] <= (1 - headroom) * device_memory_bytes


def _optimizer_state_bytes(architecture: Architecture, optimizer: str, shards: int) -> float:
    """optimizer_state_bytes of the architecture's shapes, one block's times the number of blocks, so that the
    arithmetic stays quick at any depth."""
    embedding, *block, norm = parameter_shapes(architecture.vocabulary_size, architecture.embedding_dimensions, 1,
                                               architecture.feed_forward_ratio, architecture.key_value_dimensions)
    return (optimizer_state_bytes([embedding, norm], optimizer, shards)
            + architecture.num_layers * optimizer_state_bytes(block, optimizer, shards))


def _block_bytes_per_token(architecture: Architecture, mixed_precision: bool) -> float:
    """What one block saves per token: two RMSNorms, two normalized matrix inputs, attention, GELU."""
    width, heads = architecture.embedding_dimensions, architecture.num_heads
    matmul_bytes = BF16_BYTES if mixed_precision else FP32_BYTES
    norms = 2 * _rms_norm_bytes_per_token(width)
    linear_inputs = 2 * matmul_bytes * width  # what the query-key-value projection and the MLP read
    # q, k, v (one projection's output) and the attention output (which the output projection reads as a view),
    # and a logsumexp per head
    attention = matmul_bytes * (2 * width + 2 * architecture.key_value_dimensions) + FP32_BYTES * heads
    mlp = 2 * matmul_bytes * architecture.feed_forward_ratio * width  # GELU's input and output
    return norms + linear_inputs + attention + mlp


def _block_matrix_parameters(embedding_dimensions: int, feed_forward_ratio: int,
                             key_value_dimensions: int | None = None) -> int:
    """The weights of one block's four matrix products (the ones autocast copies to bf16): the queries' and the
    output's, the keys' and values' (key_value_dimensions wide, by default embedding_dimensions), the MLP's two."""
    keys_and_values = 2 * (key_value_dimensions or embedding_dimensions) * embedding_dimensions
    return (2 + 2 * feed_forward_ratio) * embedding_dimensions**2 + keys_and_values


def _rms_norm_bytes_per_token(embedding_dimensions: int) -> float:
    """RMSNorm saves its fp32 input, the normalized input (for the weight's gradient) and 1 / rms."""
    return FP32_BYTES * (2 * embedding_dimensions + 1)
