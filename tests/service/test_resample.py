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


@pytest.fixture
def resize_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the ``Image.resize`` calls: one call is the plain route, two the split."""
    calls: list[tuple[int, int]] = []
    depth = 0  # Pillow's RGBA resize calls resize again inside: only the outer call counts
    resize = Image.Image.resize

    def counted(
        self: Image.Image, size: tuple[int, int], *args: object, **kw: object
    ) -> Image.Image:
        nonlocal depth
        if depth == 0:
            calls.append(size)
        depth += 1
        try:
            return resize(self, size, *args, **kw)  # type: ignore[arg-type]
        finally:
            depth -= 1

    monkeypatch.setattr(Image.Image, "resize", counted)
    return calls


def test_what_it_does_not_split_takes_the_plain_route(resize_calls: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(1)
    rgb = _noise(300, 200, rng)
    alpha = Image.fromarray(rng.integers(0, 256, (200, 300, 4), dtype=np.uint8), "RGBA")
    cases = [
        # RGBA: Pillow premultiplies the alpha around each resize, so two resizes would differ.
        (alpha, (150, 100), (0, 20, 100, 90), Image.Resampling.BICUBIC, 1),
        (
            _noise(300, 200, rng, mode="L"),
            (150, 100),
            (0, 20, 100, 90),
            Image.Resampling.BICUBIC,
            1,
        ),
        (rgb, (150, 100), (0, 20, 100, 90), Image.Resampling.NEAREST, 1),
        (rgb, (150, 100), (100, 20, 200, 90), Image.Resampling.BICUBIC, 1),  # beyond the image
        (rgb, (150, 100), (0, 20, 140, 90), Image.Resampling.BICUBIC, 1),  # drops too little
        (rgb, (150, 200), (0, 20, 100, 90), Image.Resampling.BICUBIC, 1),  # one pass only
        (rgb, (300, 200), (5, 5, 105, 55), Image.Resampling.BICUBIC, 0),  # no resize at all
        (rgb, (150, 100), (0, 20, 100, 90), Image.Resampling.BICUBIC, 2),  # split, for contrast
    ]
    for image, size, box, resample, calls in cases:
        resize_calls.clear()
        got = resize_then_crop(image, size, box, resample)
        assert len(resize_calls) == calls, (image.mode, size, box, resample)
        assert got.mode == image.mode
        want = _oracle(image, size, box, resample)
        assert np.array_equal(np.asarray(got), want), (image.mode, size, box, resample)


def test_pass_order_is_pillows() -> None:
    # Vertical first only when the height shrinks by more than twice what the width does.
    assert horizontal_first((400, 300), (341, 256))
    assert horizontal_first((300, 400), (256, 341))
    assert not horizontal_first((100, 1000), (90, 100))
    assert horizontal_first((100, 300), (50, 200))  # 100 is not more than twice 50
    assert not horizontal_first((100, 301), (50, 200))
    assert horizontal_first((50, 60), (500, 600))  # upscaling


def test_splits_only_when_the_crop_drops_a_quarter_of_the_columns(
    resize_calls: list[tuple[int, int]],
) -> None:
    rng = np.random.default_rng(3)
    for source, passes in [
        ((400, 300), 2),
        ((300, 400), 1),  # portrait: an eighth of the columns dropped
        ((1920, 1080), 2),
        ((260, 300), 1),
        ((256, 300), 0),  # already at its size: only the crop
    ]:
        resize_calls.clear()
        plan = plan_center_crop(*source, resize_size=256, resolution=224, max_pixels=1 << 40)
        resize_then_crop(
            _noise(*source, rng), plan.resized, plan.crop_box, Image.Resampling.BICUBIC
        )
        assert len(resize_calls) == passes, (source, resize_calls)
