"""Cosine schedules against the closed form (dino-reference.md, Sec. 1.5)."""

from __future__ import annotations

import math

import pytest

from training.schedules import cosine_scheduler


def closed_form(base, final, epochs, niter, warmup_epochs, start=0.0):
    warm = warmup_epochs * niter
    total = epochs * niter
    out = []
    for i in range(total):
        if i < warm:
            out.append(start + (base - start) * i / (warm - 1) if warm > 1 else start)
        else:
            j, n = i - warm, total - warm
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / n)))
    return out


@pytest.mark.parametrize(
    ("base", "final", "epochs", "niter", "warmup"),
    [(1e-3, 1e-6, 10, 7, 2), (0.04, 0.4, 5, 3, 0), (0.996, 1.0, 4, 5, 0), (0.5, 0.1, 3, 1, 1)],
)
def test_cosine_scheduler_closed_form(base, final, epochs, niter, warmup):
    sched = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup)
    assert sched.shape == (epochs * niter,)
    assert sched.tolist() == pytest.approx(closed_form(base, final, epochs, niter, warmup))


def test_lr_warmup_starts_at_zero_and_peak_twice():
    sched = cosine_scheduler(1e-3, 1e-6, 10, 5, warmup_epochs=2)
    assert sched[0] == 0.0
    assert sched[9] == pytest.approx(1e-3) and sched[10] == pytest.approx(1e-3)
    assert sched[-1] > 1e-6  # never exactly the final value


def test_weight_decay_increases():
    sched = cosine_scheduler(0.04, 0.4, 3, 4)
    assert sched[0] == pytest.approx(0.04)
    assert all(b >= a for a, b in zip(sched, sched[1:], strict=False))
    assert sched[-1] < 0.4


def test_warmup_longer_than_run_is_rejected():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, 2, 3, warmup_epochs=3)
