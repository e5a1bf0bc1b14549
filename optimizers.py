"""The optimizers of pre-training: PyTorch's Adafactor made to step on FSDP2's sharded parameters, and the one
builder that pre-train.py and bench.py share."""

from collections.abc import Iterable

import torch
from torch import Tensor

from distributed import as_float, replicated


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor, same hyperparameters and state, with a step that also runs on FSDP2's sharded
    DTensor parameters: the factored second moments average whole columns, which span the shards, and
    PyTorch's in-place kernels cannot ask DTensor for that sum; these out-of-place operations can.

    scale_parameter=True is PyTorch's rule: each step is min(lr, 1/sqrt(step)) times the parameter's RMS, about
    0.02 for a freshly initialised matrix. scale_parameter=False takes steps of lr itself, as AdamW does (T5's
    setting; see docs/design.md for why pre-training uses it).
    """

    def __init__(self, params, lr: float = 1e-2, scale_parameter: bool = True, **options):
        super().__init__(params, lr=lr, **options)
        for group in self.param_groups:
            group.setdefault("scale_parameter", scale_parameter)

    @torch.no_grad()
    def step(self, closure=None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._update(parameter, group)
        return loss

    def _update(self, parameter: Tensor, group: dict) -> None:
        gradient = -parameter.grad if group["maximize"] else parameter.grad
        learning_rate = float(group["lr"])
        smallest_variance, smallest_scale = group["eps"]
        if smallest_variance is None:
            smallest_variance = torch.finfo(parameter.dtype).eps
        state = self.state[parameter]
        if not state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        step = state["step"].item()
        decay = step ** group["beta2_decay"]
        scale = learning_rate
        if group.get("scale_parameter", True):  # checkpoints from before the choice used PyTorch's rule
            relative_step = min(learning_rate, 1 / step**0.5)
            scale = max(smallest_scale, as_float(parameter.norm()) / parameter.numel() ** 0.5) * relative_step
        if group["weight_decay"]:
            parameter.mul_(1 - learning_rate * group["weight_decay"])
        if gradient.dim() > 1:
            row_mean = gradient.norm(dim=-1, keepdim=True).square() / gradient.size(-1)
            column_mean = replicated(gradient.norm(dim=-2, keepdim=True)).square() / gradient.size(-2)
            if "row_var" not in state:
                state["row_var"], state["col_var"] = torch.zeros_like(row_mean), torch.zeros_like(column_mean)
            state["row_var"].lerp_(row_mean, decay)
            state["col_var"].lerp_(column_mean, decay)
            row_scale = replicated(state["row_var"].mean(dim=-2, keepdim=True)).clamp(min=smallest_variance)
            variance = state["row_var"] @ state["col_var"] / row_scale
        else:
            if "variance" not in state:
                state["variance"] = torch.zeros_like(gradient)
            state["variance"].lerp_(gradient * gradient, decay)
            variance = state["variance"]
        update = variance.clamp(min=smallest_variance**2).rsqrt() * gradient
        clipping = max(1.0, as_float(update.norm()) / (update.numel() ** 0.5 * group["d"]))
        parameter.add_(update, alpha=-scale / clipping)


def build_optimizer(name: str, parameters: Iterable[Tensor], learning_rate: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of pre-training: "adafactor" (Adafactor taking steps of the learning rate itself, see Adafactor)
    or "adamw" (AdamW, fused on a GPU)."""
    if name == "adafactor":
        return Adafactor(parameters, lr=learning_rate, scale_parameter=False)
    return torch.optim.AdamW(parameters, lr=learning_rate, fused=device.type == "cuda")
