"""The LightGPT model: a bias-free, position-free, weight-tied GPT in pure PyTorch."""

import argparse
import hashlib
import math
import warnings
from collections.abc import Iterator
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
from tqdm import tqdm


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


def add_inference_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The flags of the scripts that run a pre-trained model on prompts: generate.py and beam_search.py."""
    parser.add_argument("--checkpoint_path", default=None,
                        help="The checkpoint written by pre-train.py (default: ./out/checkpoint.pt, or with "
                        "--lora_path the base checkpoint the adapter names).")
    parser.add_argument("--lora_path", default=None,
                        help="A LoRA adapter written by instruction-tune.py: it is merged into the base model, and "
                        "each prompt is put in the instruction template it was tuned with.")
    parser.add_argument("--prompt", default=None,
                        help="The text to complete, once; without it, prompts typed at the terminal, or one per "
                        "line of standard input.")
    parser.add_argument("--max_tokens", type=int, default=max_tokens,
                        help="The most tokens to generate per prompt; <|endoftext|> ends a text earlier.")
    parser.add_argument("--device", default=best_device(),
                        help="The device to run on: cuda, mps or cpu (default: the best one available).")
    parser.add_argument("--seed", type=int, default=None,
                        help="The seed for the random number generator, for reproducible runs.")


def check_inference_arguments(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first of add_inference_arguments' flags that cannot work."""
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens must be a positive integer, got {args.max_tokens}")
    check_device(args.device)


def load_model(
    path: str | Path | None, device: str = "cpu", lora_path: str | Path | None = None
) -> tuple["LightGPT", int, dict | None]:
    """The model a pre-training checkpoint holds (by default ./out/checkpoint.pt), in evaluation mode on the device,
    its training context length, and None. With lora_path: the adapter merged into its base (path, else the base
    the adapter names) and the adapter's prompt template."""
    if lora_path is not None:
        model, block_size, template = load_lora_model(lora_path, path)
        return model.to(device), block_size, template
    path = path or "./out/checkpoint.pt"
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get("block_size"), int):
        raise ValueError(f"{path}: not a LightGPT checkpoint (no block_size entry)")
    try:
        model = LightGPT.from_checkpoint(checkpoint)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return model.to(device).eval(), checkpoint["block_size"], None


def penalize_repeats(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """Make the tokens of the context less likely (CTRL's repetition penalty): their positive logits are divided
    by the penalty and their negative ones multiplied by it."""
    seen = context.unique()
    logits = logits.clone()
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    return logits


def top_k_top_p(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """The tokens worth sampling and their probabilities: the top_k most likely at this temperature, then of those
    the fewest whose probabilities add up to top_p (nucleus sampling; the most likely token always stays)."""
    values, tokens = (logits.float() / temperature).topk(top_k)
    probabilities = values.softmax(-1)
    more_likely_mass = probabilities.cumsum(-1) - probabilities
    probabilities = probabilities.masked_fill(more_likely_mass >= top_p, 0.0)
    return tokens, probabilities / probabilities.sum()


class KVCache:
    """One attention layer's keys and values for the tokens seen so far, in buffers allocated once."""

    def __init__(self, batch_size: int, num_heads: int, capacity: int, head_dimensions: int, like: Tensor):
        """Buffers on the device and in the dtype of `like` (the model's weights)."""
        self.keys = like.new_empty(batch_size, num_heads, capacity, head_dimensions)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the keys and values of new tokens; return those of every token so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.keys.size(2):
            raise ValueError(f"the cache holds {self.keys.size(2)} tokens; {end} do not fit")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep the cached sequences at `rows`, in that order (the beams that survive a beam search step)."""
        self.keys, self.values = (self._select(buffer, rows) for buffer in (self.keys, self.values))

    def _select(self, buffer: Tensor, rows: Tensor) -> Tensor:
        selected = buffer.new_empty(len(rows), *buffer.shape[1:])
        selected[:, :, : self.length] = buffer[rows, :, : self.length]  # copy only the filled part
        return selected


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

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "LightGPT":
        """The model of a checkpoint dictionary (see load_checkpoint), with its weights, on the CPU."""
        try:
            model = cls(**checkpoint["model_args"])
            model.load_state_dict(checkpoint["model"])
        except (TypeError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0]
            raise ValueError(f"its model_args and weights do not make a LightGPT ({reason})") from None
        return model

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

    def new_cache(self, batch_size: int, capacity: int) -> list[KVCache]:
        """An empty key/value cache, one per layer, for batch_size sequences of up to capacity tokens."""
        weights = self.token_embeddings.weight
        return [
            KVCache(batch_size, block.attention.num_heads, capacity, block.attention.head_dimensions, weights)
            for block in self.body
        ]

    def next_token_logits(self, x: Tensor, cache: list[KVCache] | None = None) -> Tensor:
        """The logits of the token that follows each row of x. With a cache, x continues the tokens cached so far,
        and its keys and values join them; without one, x is the whole context."""
        z = self.token_embeddings(x)
        for index, block in enumerate(self.body):
            z = block(z, cache[index] if cache is not None else None)
        return self.output_layer(self.output_norm(z[:, -1]))

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int = 500,
        top_p: float = 0.9,
        repeat_penalty: float = 1.0,
        block_size: int = 1024,
        use_cache: bool = True,
    ) -> Iterator[int]:
        """Sample up to max_tokens tokens that follow the prompt (a 1-D tensor of at least one token id), yielding
        each as soon as it is chosen; stop at eos_index, which is not yielded.

        The model sees at most block_size tokens: a longer prompt is cut to its last block_size tokens, and when the
        context outgrows block_size, only its most recent half is kept and the cache is rebuilt from it, so that the
        next block_size / 2 tokens again cost one single-token pass each. use_cache=False runs the same steps with a
        full forward pass over the context for every token, the slow baseline.
        """
        keep = (block_size + 1) // 2
        context = prompt[-block_size:]
        cache = self.new_cache(1, min(block_size, len(context) + max_tokens)) if use_cache else None
        logits = self.next_token_logits(context[None], cache)[0]
        for _ in range(max_tokens):
            if repeat_penalty != 1.0:
                logits = penalize_repeats(logits, context, repeat_penalty)
            candidates, probabilities = top_k_top_p(logits, temperature, top_k, top_p)
            token = candidates[torch.multinomial(probabilities, 1)]
            if token.item() == self.eos_index:
                return
            yield token.item()
            context = torch.cat((context, token))
            if use_cache and len(context) <= block_size:
                logits = self.next_token_logits(token[None], cache)[0]
            else:
                context = context[-keep:] if len(context) > block_size else context
                cache = self.new_cache(1, block_size) if use_cache else None
                logits = self.next_token_logits(context[None], cache)[0]

    @torch.no_grad()
    def beam_search(
        self,
        prompt: Tensor,
        max_tokens: int,
        beam_width: int = 16,
        num_candidates: int = 3,
        length_penalty: float = 1.0,
        block_size: int = 1024,
        show_progress: bool = False,
    ) -> list[tuple[list[int], float]]:
        """The num_candidates most likely continuations of the prompt (new tokens only), best first, with scores.

        All beams run as one batch against one cache: every step extends each of the beam_width most likely
        unfinished sequences by every token, keeps the beam_width most likely results, and finishes a sequence at
        eos_index (scored, but not among its tokens) or at max_tokens. A score is the total log-probability divided
        by the length (eos included) to the power length_penalty: 0 ranks by probability alone, 1 by the average
        per token, which favours longer sequences more. The context is cut as generate() cuts it. show_progress
        draws a progress bar of the steps on standard error.
        """

        keep = (block_size + 1) // 2
        context = prompt[-block_size:][None]
        sequences = context[:, :0]
        totals = torch.zeros(1, device=prompt.device)
        cache = self.new_cache(1, min(block_size, context.size(1) + max_tokens))
        logits = self.next_token_logits(context, cache)
        finished: list[tuple[list[int], float]] = []

        def finish(sequences: Tensor, totals: Tensor, length: int) -> None:
            finished.extend((sequence, total / length**length_penalty)
                            for sequence, total in zip(sequences.tolist(), totals.tolist()))

        steps = tqdm(range(1, max_tokens + 1), desc="Beam search", unit="token", leave=False, disable=not show_progress)
        for length in steps:
            scores = totals[:, None] + logits.float().log_softmax(-1)
            finish(sequences, scores[:, self.eos_index], length)
            scores[:, self.eos_index] = -math.inf
            totals, indices = scores.view(-1).topk(min(beam_width, scores.numel() - len(scores)))
            beams, tokens = indices // self.vocabulary_size, indices % self.vocabulary_size
            sequences = torch.cat((sequences[beams], tokens[:, None]), 1)
            if length == max_tokens:
                finish(sequences, totals, length)
            finished = sorted(finished, key=lambda candidate: candidate[1], reverse=True)[:num_candidates]
            if length == max_tokens or len(totals) == 0:
                break
            # A sequence only loses log-probability as it grows, which bounds the best score a live beam can reach.
            best_reachable = totals[0].item() / max((length + 1) ** length_penalty, max_tokens**length_penalty)
            if len(finished) == num_candidates and finished[-1][1] >= best_reachable:
                break
            context = torch.cat((context[beams], tokens[:, None]), 1)
            if context.size(1) <= block_size:
                for layer in cache:
                    layer.reorder(beams)
                logits = self.next_token_logits(tokens[:, None], cache)
            else:
                context = context[:, -keep:]
                cache = self.new_cache(len(context), block_size)
                logits = self.next_token_logits(context, cache)
        return finished


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

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cache)
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

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        batch_size, sequence_length, embedding_dimensions = x.size()
        q, k, v = (
            self.qkv_projection(x)
            .view(batch_size, sequence_length, 3, self.num_heads, self.head_dimensions)
            .permute(2, 0, 3, 1, 4)
        )
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)
        mask = None
        if past and sequence_length > 1:
            # The new tokens see every cached one, and each other only up to themselves.
            mask = torch.ones(sequence_length, past + sequence_length, dtype=torch.bool, device=x.device).tril(past)
        z = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=past == 0
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
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, len(hidden), chunk_size):
                rows = slice(start, start + chunk_size)
                log_probabilities = (hidden[rows] @ weight.T).float().log_softmax(-1)
                loss -= (log_probabilities.gather(1, targets[rows]) * scale[rows]).sum()
                minus_one = torch.full(targets[rows].shape, -1.0, device=hidden.device)
                gradient = log_probabilities.exp_().scatter_add_(1, targets[rows], minus_one).to(dtype)
                torch.mul(gradient @ weight, scale[rows], out=grad_hidden[rows])
                if grad_weight is not None:  # not when the weight is frozen, as under LoRA
                    grad_weight.addmm_(gradient.T, hidden[rows] * scale[rows])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss if ctx.needs_input_grad[1] else None, None, None


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


def weights_fingerprint(state: dict[str, Tensor]) -> str:
    """A short hash of a model's weights, from the first and last thousand numbers of each tensor: enough to tell
    the base an adapter was trained on from another base of the same shape, quickly at any model size."""
    digest = hashlib.sha256()
    for name in sorted(state):
        numbers = state[name].detach().flatten()
        digest.update(name.encode())
        digest.update(torch.cat([numbers[:1000], numbers[-1000:]]).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def trained_on_these_weights(lora_checkpoint: dict, base_checkpoint: dict) -> bool:
    """Whether the adapter was trained on the base's very weights (true of adapters that predate fingerprints)."""
    return lora_checkpoint.get("base_fingerprint") in (None, weights_fingerprint(base_checkpoint["model"]))


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
    if not trained_on_these_weights(adapter, base):
        warnings.warn(f"{lora_path} was trained on a base with other weights than {base_path} (of the same sizes); "
                      f"its answers may be poor", stacklevel=2)
    return model, base["block_size"], adapter["prompt_template"]
