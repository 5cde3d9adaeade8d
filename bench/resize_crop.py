"""What resizing only the kept columns saves in DINO's evaluation transform.

    python -m bench.resize_crop                     # 400x300 .. 4032x3024, bicubic, 224
    python -m bench.resize_crop --sizes 640x480 --seconds 2

For each source size, the service's centre crop (shorter side to 256, then 224x224, as
``models.contract`` plans it) two ways in the same run, on the same RGB image (colour waves
with noise, as the serve bench uploads):

* ``pillow``: ``image.resize(size).crop(box)``, the whole resized image (the service before
  2026-11-27, and what torchvision does);
* ``split``: :func:`service.resample.resize_then_crop`, Pillow's vertical pass run on the kept
  columns only when the crop drops at least a quarter of them (the service now).

Then the same for the whole preparation of one upload (``service.prepare.prepare_image`` on
that image saved as a quality-90 JPEG: decode, resize, crop, normalise), once with the plain
resize and once with the service's.

The two ways run call by call, alternating, for about ``--seconds`` in all (half of it for the
preparation); each figure is the median CPU time of one call (this thread's, in milliseconds).
The two resizes must be equal to the bit (the run stops otherwise). ``ratio`` and
``prepare_ratio`` are pillow / split. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

import service.preprocess
from models.contract import PreprocessingRecipe, plan_center_crop, resize_for_crop
from service.prepare import PrepareSpec, prepare_image
from service.preprocess import EXACT_RESIZE_MAX_PIXELS, INTERPOLATIONS
from service.resample import SPLIT_FILTERS, resize_then_crop

DEFAULT_SIZES = "400x300,300x400,640x480,1024x768,768x1024,1920x1080,4032x3024"
FILTER_NAMES = sorted(name for name, f in INTERPOLATIONS.items() if f in SPLIT_FILTERS)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WxH: {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return width, height


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = [_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("no size given")
    return sizes


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _plain(
    image: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: Image.Resampling,
) -> Image.Image:
    """The whole resize, then the crop."""
    return image.resize(size, resample).crop(box)


def _test_image(size: tuple[int, int]) -> Image.Image:
    """Colour waves with noise, as the serve bench uploads (a JPEG of it decodes like a photo's)."""
    rng = np.random.default_rng(size[0] * 10007 + size[1])
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    waves = np.stack([np.sin(x / 9 + y / 23 + c) * 100 + 128 for c in range(3)], -1)  # (H, W, 3)
    noisy = waves + rng.normal(0, 12, waves.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@contextmanager
def _service_resize(way: Callable[..., Image.Image]) -> Iterator[None]:
    """Make ``service.preprocess`` resize with ``way`` for a while."""
    saved = service.preprocess.resize_then_crop
    service.preprocess.resize_then_crop = way
    try:
        yield
    finally:
        service.preprocess.resize_then_crop = saved


def _alternating_ms(ways: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Median CPU milliseconds per call of each way, calls alternating (first way swapped each
    round) for about ``seconds`` in all, at least 5 rounds."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    order = list(ways)
    started = time.perf_counter()
    rounds = 0
    while rounds < 5 or time.perf_counter() - started < seconds:
        for name in order if rounds % 2 == 0 else reversed(order):
            before = time.thread_time()
            ways[name]()
            times[name].append((time.thread_time() - before) * 1000)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def compare(
    source: tuple[int, int], *, resolution: int, interpolation: str, seconds: float
) -> dict[str, object]:
    """Time both ways on one source size; the two resizes must agree to the bit.

    Raises:
        SystemExit: The two ways disagree, or the service would not resize this size whole
            (its intermediate exceeds ``EXACT_RESIZE_MAX_PIXELS``).
    """
    resample = INTERPOLATIONS[interpolation]
    image = _test_image(source)
    plan = plan_center_crop(
        *source,
        resize_size=resize_for_crop(resolution),
        resolution=resolution,
        max_pixels=EXACT_RESIZE_MAX_PIXELS,
    )
    if plan.source_box is not None:
        raise SystemExit(
            f"{source[0]}x{source[1]}: the service resizes only the crop region of this size "
            "(its resized image exceeds EXACT_RESIZE_MAX_PIXELS); nothing to compare"
        )
    ways: dict[str, Callable[[], object]] = {
        "pillow": lambda: _plain(image, plan.resized, plan.crop_box, resample),
        "split": lambda: resize_then_crop(image, plan.resized, plan.crop_box, resample),
    }
    if not np.array_equal(np.asarray(ways["pillow"]()), np.asarray(ways["split"]())):
        raise SystemExit(f"the two ways disagree on {source[0]}x{source[1]}")
    medians = _alternating_ms(ways, seconds)
    upload = io.BytesIO()
    image.save(upload, format="JPEG", quality=90)
    spec = PrepareSpec(
        recipe=PreprocessingRecipe(
            resolution=resolution,
            resize_size=resize_for_crop(resolution),
            interpolation=interpolation,
        ),
        resolution=resolution,
        crop="center",
        patch_size=8,
        num_heads=1,
        max_side=resolution,
        max_image_pixels=max(source[0] * source[1], 1),
        jpeg_draft=False,
        max_attention_bytes=1 << 62,
    )

    def prepare(way: Callable[..., Image.Image]) -> Callable[[], object]:
        def run() -> object:
            with _service_resize(way):
                return prepare_image(upload.getvalue(), 0, spec)

        return run

    prepared = _alternating_ms(
        {"pillow": prepare(_plain), "split": prepare(resize_then_crop)}, seconds / 2
    )
    return {
        "source": list(source),
        "resized": list(plan.resized),
        "pillow_ms": round(medians["pillow"], 4),
        "split_ms": round(medians["split"], 4),
        "ratio": round(medians["pillow"] / medians["split"], 3),
        "prepare_pillow_ms": round(prepared["pillow"], 4),
        "prepare_split_ms": round(prepared["split"], 4),
        "prepare_ratio": round(prepared["pillow"] / prepared["split"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=_sizes(DEFAULT_SIZES), help="WxH,...")
    parser.add_argument("--resolution", type=int, default=224, help="crop side")
    parser.add_argument("--interpolation", choices=FILTER_NAMES, default="bicubic", help="filter")
    parser.add_argument("--seconds", type=_seconds, default=3.0, help="time per source size")
    args = parser.parse_args(argv)
    if args.resolution < 1:
        parser.error("--resolution must be at least 1")
    results = [
        compare(
            source,
            resolution=args.resolution,
            interpolation=args.interpolation,
            seconds=args.seconds,
        )
        for source in args.sizes
    ]
    report = {
        "resolution": args.resolution,
        "interpolation": args.interpolation,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
