"""Per-iteration schedules of the DINO recipe (Caron et al., 2021, ``utils.cosine_scheduler``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> npt.NDArray[np.float64]:
    """One value per iteration: a linear warm-up, then a half cosine from base to final.

    Reproduces the reference exactly: the warm-up is ``linspace(start, base, warmup_iters)``
    (so the peak appears twice), and the cosine part ``final + (base - final)(1 + cos(pi j/J))/2``
    for ``j = 0..J-1`` never reaches ``final_value`` exactly.

    Args:
        base_value: Value after the warm-up (the peak for the learning rate).
        final_value: Value approached at the end.
        epochs: Number of epochs.
        niter_per_ep: Iterations per epoch.
        warmup_epochs: Epochs of linear warm-up.
        start_warmup_value: First value of the warm-up.

    Returns:
        Array of length ``epochs * niter_per_ep``.

    Raises:
        ValueError: The warm-up is longer than the run or sizes are negative.
    """
    if epochs < 0 or niter_per_ep < 0 or warmup_epochs < 0:
        raise ValueError("epochs, niter_per_ep and warmup_epochs must be non-negative")
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) exceeds epochs ({epochs})")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.array([], dtype=np.float64)
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1))
    )
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, nepochs: int
) -> npt.NDArray[np.float64]:
    """Per-epoch teacher temperature: ``linspace`` warm-up, then constant.

    As in the reference, ``linspace`` includes both ends, so ``teacher_temp`` is reached at epoch
    ``warmup_epochs - 1`` (the reference's off-by-one, kept on purpose).

    Raises:
        ValueError: The warm-up is longer than the run.
    """
    if warmup_epochs > nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs ({warmup_epochs}) exceeds the epochs ({nepochs})"
        )
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(nepochs - warmup_epochs) * teacher_temp,
        )
    ).astype(np.float64)
