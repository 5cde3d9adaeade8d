"""Teacher update: exponential moving average of the student's parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ParameterEMA:
    """``teacher <- m * teacher + (1 - m) * student`` over all parameters, with foreach kernels.

    Parameters are paired by name (the reference pairs them by position, which is the same
    order for identical architectures); buffers are not averaged.

    Args:
        student: The trained network (unwrapped from DDP).
        teacher: The EMA network with the same parameter names.

    Raises:
        ValueError: The two networks do not have the same parameters.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s_params = dict(student.named_parameters())
        t_params = dict(teacher.named_parameters())
        if s_params.keys() != t_params.keys():
            diff = sorted(set(s_params) ^ set(t_params))
            raise ValueError(f"student and teacher parameters differ: {diff[:5]}")
        for name, p in s_params.items():
            if p.shape != t_params[name].shape:
                raise ValueError(f"shape mismatch for {name}: {p.shape} vs {t_params[name].shape}")
        self.names = list(s_params)
        self.student_params: list[Tensor] = [s_params[n] for n in self.names]
        self.teacher_params: list[Tensor] = [t_params[n] for n in self.names]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """Apply one EMA step with momentum ``m``."""
        teacher = [p.data for p in self.teacher_params]
        student = [p.detach() for p in self.student_params]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
