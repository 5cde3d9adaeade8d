from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.posembed import interpolate_pos_embed
from models.vit import _spatial_size as vit_spatial_size


def _cubic(x: float) -> float:
    a = -0.75
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def numpy_reference(pos_embed: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """The reference formula written independently in float64 numpy (dino-reference.md 2.3)."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    gh, gw = height // patch, width // patch
    if gh * gw == n and height == width:
        return pos_embed
    grid = pos_embed[0, 1:].reshape(side, side, -1)

    def weights(g: int) -> np.ndarray:
        scale_factor = (g + 0.1) / math.sqrt(n)
        out = np.zeros((g, side))
        for d in range(g):
            src = (d + 0.5) / scale_factor - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                out[d, min(max(base + k, 0), side - 1)] += _cubic(src - (base + k))
        return out

    resized = np.einsum("ia,jb,abd->ijd", weights(gh), weights(gw), grid)
    return np.concatenate([pos_embed[:, :1], resized.reshape(1, gh * gw, -1)], axis=1)


def torch_reference(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """The reference code path: F.interpolate with the +0.1 scale factor."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if (height // patch) * (width // patch) == n and height == width:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((height // patch + 0.1) / math.sqrt(n), (width // patch + 0.1) / math.sqrt(n))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])
    return torch.cat((pos_embed[:, :1], grid), dim=1)


SIZES = [
    (14, 16, 224, 224),
    (14, 16, 320, 256),
    (14, 16, 256, 320),
    (14, 16, 224, 230),  # same 14x14 grid, but H != W: the reference still resamples
    (14, 16, 96, 96),
    (14, 16, 480, 480),
    (28, 8, 480, 320),
    (4, 8, 48, 40),
    (4, 8, 24, 56),
]


@pytest.mark.parametrize(("side", "patch", "height", "width"), SIZES)
def test_matches_reference_formula(side: int, patch: int, height: int, width: int) -> None:
    torch.manual_seed(side + height + width)
    pos = torch.randn(1, side * side + 1, 8)
    ours = interpolate_pos_embed(pos, torch.tensor(height), torch.tensor(width), patch)
    expected_torch = torch_reference(pos, height, width, patch)
    expected_numpy = numpy_reference(pos.double().numpy(), height, width, patch)
    assert ours.shape == expected_torch.shape == (1, 1 + (height // patch) * (width // patch), 8)
    torch.testing.assert_close(ours, expected_torch, rtol=0, atol=1e-5)
    # float64 ideal vs float32 index arithmetic (as PyTorch does it): agree to ~1e-5
    np.testing.assert_allclose(ours.numpy(), expected_numpy, rtol=0, atol=5e-5)


def test_rows_are_height_and_not_transposed() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 17, 4)
    out = interpolate_pos_embed(pos, torch.tensor(16), torch.tensor(40), 4)  # 4 rows, 10 cols
    expected = numpy_reference(pos.double().numpy(), 16, 40, 4)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_scale_quirk_differs_from_size_based_resize() -> None:
    """The +0.1 scale factor is not the same as resizing to size=(g_h, g_w) (pitfall 1)."""
    torch.manual_seed(0)
    pos = torch.randn(1, 197, 16)
    ours = interpolate_pos_embed(pos, torch.tensor(320), torch.tensor(256), 16)
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    sized = (
        F.interpolate(grid, size=(20, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 16)
    )
    assert (ours[:, 1:] - sized).abs().max() > 0.05


def test_identity_at_training_size_is_exact() -> None:
    pos = torch.randn(1, 197, 8)
    out = interpolate_pos_embed(pos, torch.tensor(224), torch.tensor(224), 16)
    assert torch.equal(out, pos)


def test_non_square_stored_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 11, 4), torch.tensor(32), torch.tensor(32), 8)


@pytest.mark.parametrize(("side", "patch", "height", "width"), SIZES)
def test_int_sizes_give_the_traced_path_bit_for_bit(
    side: int, patch: int, height: int, width: int
) -> None:
    """Eager/compile (int sizes, cached matrices) and export (tensor sizes) agree exactly."""
    torch.manual_seed(side * height + width)
    pos = torch.randn(1, side * side + 1, 8)
    traced = interpolate_pos_embed(pos, torch.tensor(height), torch.tensor(width), patch)
    for _ in range(2):  # the second call takes the matrices from the cache
        assert torch.equal(interpolate_pos_embed(pos, height, width, patch), traced)


def test_matrices_cached_in_inference_mode_still_train() -> None:
    """A matrix first built under inference_mode must be usable in a later backward pass."""
    pos = torch.randn(1, 17, 4)
    with torch.inference_mode():
        interpolate_pos_embed(pos, 20, 12, 4)
    trainable = pos.clone().requires_grad_(True)
    interpolate_pos_embed(trainable, 20, 12, 4).sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_vit_gives_python_sizes_eagerly_and_tensors_when_tracing() -> None:
    x = torch.randn(1, 3, 40, 24)
    assert vit_spatial_size(x) == (40, 24)

    def probe(t: torch.Tensor) -> torch.Tensor:
        height, width = vit_spatial_size(t)
        assert isinstance(height, torch.Tensor) and isinstance(width, torch.Tensor)
        return t * height

    torch.jit.trace(probe, (x,), check_trace=False)


def test_resampling_stays_float32_under_autocast() -> None:
    """As the reference's F.interpolate: autocast must not run the resize in bfloat16."""
    torch.manual_seed(0)
    pos = torch.randn(1, 197, 16)
    expected = torch_reference(pos, 96, 96, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = interpolate_pos_embed(pos, 96, 96, 16)
        traced_path = interpolate_pos_embed(pos, torch.tensor(96), torch.tensor(96), 16)
    assert ours.dtype == traced_path.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert torch.equal(ours, traced_path)
