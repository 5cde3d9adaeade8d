"""Optimisers, parameter groups, per-tensor clipping and the last-layer freeze of DINO."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

OPTIMIZERS = ("adamw", "sgd", "lars")


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The reference's two groups: regularised weights, then biases and 1-D tensors (wd 0).

    Parameters without ``requires_grad`` are skipped. ``cls_token`` and ``pos_embed`` (3-D)
    are regularised.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """LARS as in the DINO repository: weight decay and trust ratio skip 1-D parameters.

    ``update = g + wd * p``; for non-1-D tensors it is scaled by ``eta * ||p|| / ||update||``
    (1 when either norm is 0); then heavy-ball momentum ``mu = momentum * mu + update`` and
    ``p -= lr * mu``.

    Args:
        params: Parameters or groups.
        lr: Learning rate (overwritten by the schedule).
        weight_decay: Weight decay.
        momentum: Momentum factor.
        eta: Trust coefficient.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(update)
                    one = torch.ones_like(param_norm)
                    ratio = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, param_groups: list[dict[str, Any]], *, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (default betas/eps), SGD (momentum 0.9) or LARS; lr and wd come from schedules.

    Args:
        name: ``adamw``, ``sgd`` or ``lars``.
        param_groups: Output of :func:`get_params_groups`.
        fused: Use the fused AdamW kernel (CUDA or CPU: the same update up to rounding, one
            launch, and its step counts stay on the device, so no host sync).

    Raises:
        ValueError: Unknown optimiser name.
    """
    if name == "adamw":
        if fused:
            return torch.optim.AdamW(param_groups, fused=True)
        return torch.optim.AdamW(param_groups)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0, momentum=0.9)
    if name == "lars":
        return LARS(param_groups)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> Tensor | None:
    """Per-tensor clipping: each gradient is scaled by ``min(1, clip / (||g|| + 1e-6))``.

    This is the reference's ``clip_gradients``, not a global-norm clip, computed with foreach
    kernels and without a host synchronisation per tensor.

    Returns:
        The gradient norms before clipping (one per tensor with a gradient), or None when no
        parameter has a gradient.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).float()  # (P,)
    # clip / (norm + 1e-6) for all tensors at once: the same float32 arithmetic as one
    # division per tensor, in three kernels instead of three per tensor.
    coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)  # (P,)
    torch._foreach_mul_(grads, list(coefs.unbind(0)))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Set the gradient of every ``last_layer`` parameter to None while ``epoch < freeze``.

    A None gradient (not a zero one) makes AdamW skip the tensor entirely: no moment update,
    no weight decay, no step count.
    """
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None
