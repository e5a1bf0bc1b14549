"""The output layer and the cross entropy fused, a chunk of positions at a time, so that the (positions x
vocabulary) logits never exist whole: for training, for evaluation and for scoring each row."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy


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
