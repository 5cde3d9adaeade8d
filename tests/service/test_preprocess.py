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
from service.preprocess import (
    EXACT_RESIZE_MAX_PIXELS,
    Geometry,
    normalize,
    plan_geometry,
    round_to_patch,
    to_pixels,
)
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


def _center(width: int, height: int, resolution: int) -> Geometry:
    recipe = PreprocessingRecipe.for_resolution(resolution)
    return plan_geometry(
        width,
        height,
        recipe=recipe,
        resolution=resolution,
        crop="center",
        patch_size=8,
        max_side=1024,
    )


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 200_000),
    height=st.integers(1, 200_000),
    resolution=st.sampled_from([8, 32, 224, 1024]),
)
def test_center_crop_never_plans_a_huge_intermediate(
    width: int, height: int, resolution: int
) -> None:
    geometry = _center(width, height, resolution)
    assert geometry.size == (resolution, resolution)
    resized_pixels = geometry.resized[0] * geometry.resized[1]
    if geometry.source_box is None:
        assert resized_pixels <= EXACT_RESIZE_MAX_PIXELS
    else:
        left, top, right, bottom = geometry.source_box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_extreme_aspect_ratio_resizes_only_the_crop() -> None:
    # 1 x 100000: torchvision's intermediate would be 293 x 29,300,000 pixels (~26 GB of RGB).
    ramp = np.linspace(0, 255, 100_000).astype(np.uint8)[:, None, None].repeat(3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(ramp))  # (100000, 1, 3), brightening downwards
    recipe = PreprocessingRecipe.for_resolution(256)
    geometry = _center(1, 100_000, 256)
    assert geometry.resized == (293, 29_300_000) and geometry.source_box is not None
    pixels = to_pixels(image, geometry, recipe)
    assert pixels.shape == (3, 256, 256)
    grey = pixels[0] * recipe.std[0] + recipe.mean[0]  # back to 0..1
    # the centre crop covers rows ~49,956..50,044 of the ramp: mid-grey, constant across
    assert np.all(np.abs(grey * 255 - 127.5) <= 1.5)
    np.testing.assert_allclose(grey, grey[:, :1].repeat(256, axis=1), atol=1e-6)


@pytest.mark.parametrize(
    ("size", "resolution"),
    [((320, 240), 224), ((180, 260), 224), ((33, 57), 32), ((17, 301), 64), ((900, 40), 32)],
)
def test_crop_region_resize_is_close_to_torchvision(
    size: tuple[int, int], resolution: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the bounded path on ordinary images: it samples the same source positions, and
    # differs from torchvision only by Pillow's fixed-point rounding.
    monkeypatch.setattr("service.preprocess.EXACT_RESIZE_MAX_PIXELS", 0)
    image = Image.fromarray(gradient_rgb(*size, seed=size[1]))
    recipe = PreprocessingRecipe.for_resolution(resolution)
    geometry = _center(*size, resolution)
    assert geometry.source_box is not None
    ours = to_pixels(image, geometry, recipe)
    expected = torchvision_eval(image, recipe)
    one_level = 1.0 / 255.0 / min(recipe.std) + 1e-5
    assert np.abs(ours - expected).max() <= 3 * one_level
    assert np.abs(ours - expected).mean() <= 0.1 * one_level


def test_crop_none_bounds_extreme_aspect_ratios() -> None:
    recipe = PreprocessingRecipe.for_resolution(224)
    for width, height in [(1, 100_000), (100_000, 1), (3, 40_000)]:
        geometry = plan_geometry(
            width, height, recipe=recipe, resolution=224, crop="none", patch_size=16, max_side=512
        )
        assert max(geometry.size) <= 512 and min(geometry.size) >= 16
        assert geometry.resized == geometry.size


def test_normalisation_is_torchvisions_to_tensor_and_normalize_bit_for_bit() -> None:
    recipe = PreprocessingRecipe.for_resolution(32)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # (H, W, 3)
    rgb.reshape(-1)[:256] = np.arange(256)  # every 8-bit value in some channel
    reference = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(recipe.mean, recipe.std)]
    )
    expected: torch.Tensor = reference(Image.fromarray(rgb))
    pixels = normalize(rgb, recipe)
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    np.testing.assert_array_equal(pixels, expected.numpy())
