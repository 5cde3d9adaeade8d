"""The DINO self-distillation loss with the teacher centre (Caron et al., 2021, Sec. 3.1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from training.schedules import teacher_temp_schedule


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over crop pairs.

    The teacher sees the 2 global crops, the student all ``ncrops`` crops (crop-major rows).
    Every (teacher view, student view) pair with different views contributes the batch mean of
    ``-sum_k q log p``; the loss is the plain mean over the ``2 * ncrops - 2`` pair terms. After
    the loss, the centre becomes an EMA of the *global* batch mean of the raw teacher logits.

    Args:
        out_dim: Head output dimension K.
        ncrops: Crops per image seen by the student (2 global + local ones).
        warmup_teacher_temp: Teacher temperature at epoch 0.
        teacher_temp: Teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: Epochs of the linear temperature warm-up.
        nepochs: Total epochs.
        student_temp: Student temperature.
        center_momentum: EMA momentum of the centre.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"ncrops must be at least 2 (the global crops), got {ncrops}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        # Mean entropy (nats) of the last teacher distribution, for the collapse watch.
        self.last_teacher_entropy: Tensor = torch.zeros(())

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        """Loss of one iteration; also updates :attr:`center` (so call it once per step).

        Args:
            student_output: ``[ncrops * B, K]`` student logits, crop-major.
            teacher_output: ``[2 * B, K]`` teacher logits of the global crops, crop-major.
            epoch: Current epoch (indexes the teacher temperature schedule).

        Returns:
            Scalar loss.
        """
        student = student_output.float() / self.student_temp
        log_p = F.log_softmax(student, dim=-1)  # (ncrops * B, K)
        log_p = log_p.view(self.ncrops, -1, log_p.shape[-1])  # (ncrops, B, K)
        temp = float(self.teacher_temp_schedule[epoch])
        teacher = teacher_output.detach().float()
        q = F.softmax((teacher - self.center) / temp, dim=-1)  # (2B, K)
        q0, q1 = q.chunk(2)
        # Sum of the teacher targets each student view is compared with (same-view pairs skipped):
        # view 0 <- teacher 1, view 1 <- teacher 0, local views <- both (all local views in one
        # product: a few kernels instead of four per view).
        total = -(q1 * log_p[0]).sum(dim=-1).mean() - (q0 * log_p[1]).sum(dim=-1).mean()
        if self.ncrops > 2:
            both = q0 + q1  # (B, K)
            total = total - (both * log_p[2:]).sum(dim=-1).mean(dim=-1).sum()  # per view, summed
        n_terms = 2 * self.ncrops - 2
        with torch.no_grad():
            self.last_teacher_entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
        self.update_center(teacher)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the batch mean of raw teacher logits, all-reduced over ranks when distributed."""
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)  # (1, K)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
