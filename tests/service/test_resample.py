"""service.resample against its oracle: Pillow's resize of the whole image, then the crop."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.contract import plan_center_crop
from service.resample import SPLIT_FILTERS, horizontal_first, resize_then_crop

FILTERS = sorted(SPLIT_FILTERS, key=int)


def _noise(width: int, height: int, rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """Random pixels: every coefficient and every 8-bit rounding shows in the result."""
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)  # (H, W, C)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _oracle(
    image: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: Image.Resampling,
) -> np.ndarray:
    return np.asarray(image.resize(size, resample).crop(box))


def _geometries(rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int, int, int]]:
    """(width, height, new width, new height, left, top) with a box inside the new size.

    Centre crops as the service plans them (landscape, portrait, strips, images smaller than
    the crop, so upscaled) and arbitrary boxes in arbitrary sizes, one axis sometimes unchanged.
    """
    out = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(1, 700, 2))
        if i % 5 == 0:
            height = int(rng.integers(1, 12))  # a strip
        if i % 2 == 0:
            resolution = int(rng.choice([16, 64, 112, 224]))
            plan = plan_center_crop(
                width,
                height,
                resize_size=resolution * 8 // 7,
                resolution=resolution,
                max_pixels=1 << 40,
            )
            new_width, new_height = plan.resized
            left, top = plan.crop_box[:2]
            out.append((width, height, new_width, new_height, left, top))
            continue
        new_width = width if i % 7 == 1 else int(rng.integers(1, 500))
        new_height = height if i % 7 == 3 else int(rng.integers(1, 500))
        left, top = int(rng.integers(0, new_width)), int(rng.integers(0, new_height))
        out.append((width, height, new_width, new_height, left, top))
    return out


def test_equals_resizing_the_whole_image_then_cropping() -> None:
    rng = np.random.default_rng(0)
    split = plain = 0
    for width, height, new_width, new_height, left, top in _geometries(rng, 160):
        image = _noise(width, height, rng)
        right = int(rng.integers(left + 1, new_width + 1))
        bottom = int(rng.integers(top + 1, new_height + 1))
        box = (left, top, right, bottom)
        if (
            horizontal_first((width, height), (new_width, new_height))
            and new_width != width
            and new_height != height
            and (new_width - (right - left)) * 4 >= new_width
        ):
            split += 1
        else:
            plain += 1
        resample = FILTERS[int(rng.integers(0, len(FILTERS)))]
        got = np.asarray(resize_then_crop(image, (new_width, new_height), box, resample))
        want = _oracle(image, (new_width, new_height), box, resample)
        assert got.shape == want.shape and np.array_equal(got, want), (
            f"{width}x{height} -> {new_width}x{new_height}, box {box}, {resample.name}"
        )
    assert split >= 80 and plain >= 20, (split, plain)  # both routes were exercised


@pytest.mark.parametrize("resample", FILTERS, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "source",
    [
        (400, 300),
        (300, 400),
        (640, 480),
        (2000, 150),
        (150, 2000),
        (224, 224),
        (100, 80),
        (256, 900),
    ],
)
def test_service_centre_crops_match_for_every_filter(
    source: tuple[int, int], resample: Image.Resampling
) -> None:
    rng = np.random.default_rng(source[0] * 7919 + source[1])
    image = _noise(*source, rng)
    plan = plan_center_crop(*source, resize_size=256, resolution=224, max_pixels=1 << 40)
    got = np.asarray(resize_then_crop(image, plan.resized, plan.crop_box, resample))
    assert got.shape == (224, 224, 3)
    assert np.array_equal(got, _oracle(image, plan.resized, plan.crop_box, resample))


def test_what_it_does_not_split_takes_the_plain_route() -> None:
    rng = np.random.default_rng(1)
    grey = _noise(300, 200, rng, mode="L")
    got = resize_then_crop(grey, (150, 100), (10, 20, 110, 90), Image.Resampling.BICUBIC)
    assert got.mode == "L"
    assert np.array_equal(
        np.asarray(got), _oracle(grey, (150, 100), (10, 20, 110, 90), Image.Resampling.BICUBIC)
    )
    rgb = _noise(300, 200, rng)
    for size, box, resample in [
        ((150, 100), (10, 20, 110, 90), Image.Resampling.NEAREST),
        ((150, 100), (100, 20, 200, 90), Image.Resampling.BICUBIC),  # beyond the resized image
        ((300, 200), (5, 5, 105, 55), Image.Resampling.BICUBIC),  # no resize at all
    ]:
        got_rgb = np.asarray(resize_then_crop(rgb, size, box, resample))
        assert np.array_equal(got_rgb, _oracle(rgb, size, box, resample)), (size, box, resample)


def test_pass_order_is_pillows() -> None:
    # Vertical first only when the height shrinks by more than twice what the width does.
    assert horizontal_first((400, 300), (341, 256))
    assert horizontal_first((300, 400), (256, 341))
    assert not horizontal_first((100, 1000), (90, 100))
    assert horizontal_first((100, 300), (50, 200))  # 100 is not more than twice 50
    assert not horizontal_first((100, 301), (50, 200))
    assert horizontal_first((50, 60), (500, 600))  # upscaling


def test_splits_only_when_the_crop_drops_a_quarter_of_the_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def counted(
        self: Image.Image, size: tuple[int, int], *args: object, **kw: object
    ) -> Image.Image:
        calls.append(size)
        return resize(self, size, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", counted)
    rng = np.random.default_rng(3)
    for source, passes in [
        ((400, 300), 2),
        ((300, 400), 1),
        ((1920, 1080), 2),
        ((260, 300), 1),
        ((256, 300), 0),
    ]:
        calls.clear()
        plan = plan_center_crop(*source, resize_size=256, resolution=224, max_pixels=1 << 40)
        resize_then_crop(
            _noise(*source, rng), plan.resized, plan.crop_box, Image.Resampling.BICUBIC
        )
        assert len(calls) == passes, (source, calls)
