"""DINOLoss against the reference formula (dino-reference.md, Sec. 1.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.loss import DINOLoss
from training.schedules import teacher_temp_schedule


def reference_loss(student, teacher, center, ncrops, temp, student_temp=0.1):
    """The reference: loop over (teacher view, student view) pairs, skip equal views."""
    s = (student / student_temp).chunk(ncrops)
    t = F.softmax((teacher - center) / temp, dim=-1).chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(ncrops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n, n


@pytest.mark.parametrize("ncrops", [2, 4, 10])
def test_loss_matches_reference_and_term_count(ncrops):
    torch.manual_seed(0)
    batch, k = 5, 32
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.07, 3, 10)
    loss_fn.center.copy_(torch.randn(1, k) * 0.1)
    center = loss_fn.center.clone()
    student = torch.randn(ncrops * batch, k, dtype=torch.float64).float()
    teacher = torch.randn(2 * batch, k)
    for epoch in (0, 1, 5):
        loss_fn.center.copy_(center)
        ours = student.clone().requires_grad_()
        got = loss_fn(ours, teacher, epoch)
        temp = float(loss_fn.teacher_temp_schedule[epoch])
        theirs = student.clone().requires_grad_()
        want, n = reference_loss(theirs, teacher, center, ncrops, temp)
        assert n == 2 * ncrops - 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.backward()
        want.backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_loss_gradient_only_through_student():
    loss_fn = DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    student = torch.randn(12, 8, requires_grad=True)
    teacher = torch.randn(6, 8, requires_grad=True)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_center_update_is_ema_of_raw_teacher_mean_after_loss():
    torch.manual_seed(1)
    loss_fn = DINOLoss(16, 3, 0.04, 0.04, 0, 1)
    teacher = torch.randn(8, 16)
    loss_fn(torch.randn(12, 16), teacher, 0)
    expected = 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)
    teacher2 = torch.randn(8, 16)
    loss_fn(torch.randn(12, 16), teacher2, 0)
    torch.testing.assert_close(
        loss_fn.center, 0.9 * expected + 0.1 * teacher2.mean(0, keepdim=True)
    )


def test_teacher_temperature_schedule_off_by_one():
    sched = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(sched) == 100
    assert sched[0] == pytest.approx(0.04)
    assert sched[29] == pytest.approx(0.07)  # reached at warmup - 1 (linspace includes the end)
    assert sched[28] < 0.07
    np.testing.assert_allclose(sched[:30], 0.04 + 0.03 * np.arange(30) / 29)
    np.testing.assert_allclose(sched[30:], 0.07)
    assert np.all(teacher_temp_schedule(0.04, 0.04, 0, 5) == 0.04)
    loss_fn = DINOLoss(4, 2, 0.04, 0.07, 30, 100)
    np.testing.assert_array_equal(loss_fn.teacher_temp_schedule, sched)
