"""Preprocessing against torchvision (DINO's evaluation transform) and geometry properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms

from models.contract import PreprocessingRecipe
from service.preprocess import plan_geometry, round_to_patch, to_pixels
from tests.service.conftest import gradient_rgb


def torchvision_eval(image: Image.Image, recipe: PreprocessingRecipe) -> np.ndarray:
    transform = transforms.Compose(
        [
            transforms.Resize(
                recipe.resize_size, interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(recipe.resolution),
            transforms.ToTensor(),
            transforms.Normalize(recipe.mean, recipe.std),
        ]
    )
    pixels: torch.Tensor = transform(image)
    return pixels.numpy()


@pytest.mark.parametrize(
    ("size", "resolution"),
    [((320, 240), 224), ((180, 260), 224), ((33, 57), 32), ((500, 499), 96), ((17, 301), 64)],
)
def test_center_crop_matches_torchvision(size: tuple[int, int], resolution: int) -> None:
    image = Image.fromarray(gradient_rgb(*size, seed=size[0]))
    recipe = PreprocessingRecipe.for_resolution(resolution)
    geometry = plan_geometry(
        *size, recipe=recipe, resolution=resolution, crop="center", patch_size=8, max_side=1024
    )
    ours = to_pixels(image, geometry, recipe)
    assert ours.shape == (3, resolution, resolution) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torchvision_eval(image, recipe), atol=1e-5)


def test_other_resolutions_use_the_same_crop_ratio() -> None:
    recipe = PreprocessingRecipe.for_resolution(224)
    geometry = plan_geometry(
        400, 300, recipe=recipe, resolution=112, crop="center", patch_size=16, max_side=1024
    )
    assert geometry.resized == (170, 128)  # shorter side round(112 / 0.875) = 128
    assert geometry.size == (112, 112)


def test_round_to_patch() -> None:
    assert [round_to_patch(v, 16) for v in [1, 8, 9, 23, 24, 25, 224]] == [
        16,
        16,
        16,
        16,
        32,
        32,
        224,
    ]


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    resolution=st.sampled_from([16, 32, 224, 448]),
    max_side=st.integers(16, 2048),
)
def test_crop_none_geometry(width: int, height: int, resolution: int, max_side: int) -> None:
    recipe = PreprocessingRecipe.for_resolution(224)
    geometry = plan_geometry(
        width,
        height,
        recipe=recipe,
        resolution=resolution,
        crop="none",
        patch_size=16,
        max_side=max_side,
    )
    out_w, out_h = geometry.size
    limit = max(16, max_side // 16 * 16)
    assert out_w % 16 == 0 and out_h % 16 == 0
    assert 16 <= out_w <= limit and 16 <= out_h <= limit
    assert geometry.crop_box is None
    if max(width, height) * resolution / min(width, height) <= limit:
        assert abs(min(out_w, out_h) - resolution) <= 8  # shorter side near the request
    if width >= 4 * 16 and height >= 4 * 16 and out_w >= 64 and out_h >= 64:
        # aspect kept up to the half-patch rounding of each side
        assert (
            abs(out_w / out_h - width / height) <= (width / height) * (8 / out_w + 8 / out_h) * 1.1
        )


def test_crop_none_pixels_cover_the_whole_image() -> None:
    rgb = np.zeros((40, 90, 3), np.uint8)
    rgb[:, :10] = 255  # a white band at the left edge survives (nothing is cropped)
    recipe = PreprocessingRecipe.for_resolution(32)
    geometry = plan_geometry(
        90, 40, recipe=recipe, resolution=32, crop="none", patch_size=8, max_side=512
    )
    pixels = to_pixels(Image.fromarray(rgb), geometry, recipe)
    assert pixels.shape == (3, 32, 72)
    white = (1 - recipe.mean[0]) / recipe.std[0]
    assert pixels[0, :, 0].min() > white - 0.05
