"""What resizing only the kept columns saves in DINO's evaluation transform.

    python -m bench.resize_crop                     # 400x300 .. 4032x3024, bicubic, 224
    python -m bench.resize_crop --sizes 640x480 --seconds 2

For each source size, the service's centre crop (shorter side to 256, then 224x224) two ways
in the same run, on the same random-noise RGB image:

* ``pillow``: ``image.resize(size).crop(box)``, the whole resized image (the service before
  2026-11-27, and what torchvision does);
* ``split``: :func:`service.resample.resize_then_crop`, Pillow's vertical pass run on the kept
  columns only (the service now).

The two ways run call by call, alternating, for about ``--seconds`` in all; the figure is the
median CPU time of one call (this thread's, in milliseconds). The two results must be equal to the
bit (the run stops otherwise). ``ratio`` is pillow / split. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from models.contract import plan_center_crop
from service.preprocess import INTERPOLATIONS
from service.resample import resize_then_crop

DEFAULT_SIZES = "400x300,300x400,640x480,1024x768,768x1024,1920x1080,4032x3024"


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WxH: {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return width, height


def _sizes(text: str) -> list[tuple[int, int]]:
    return [_size(part) for part in text.split(",") if part.strip()]


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
    """Time both ways on one source size; the results must agree to the bit."""
    resample = INTERPOLATIONS[interpolation]
    rng = np.random.default_rng(source[0] * 10007 + source[1])
    pixels = rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)  # (H, W, 3)
    image = Image.fromarray(pixels)
    plan = plan_center_crop(
        *source, resize_size=resolution * 8 // 7, resolution=resolution, max_pixels=1 << 40
    )
    ways: dict[str, Callable[[], Image.Image]] = {
        "pillow": lambda: image.resize(plan.resized, resample).crop(plan.crop_box),
        "split": lambda: resize_then_crop(image, plan.resized, plan.crop_box, resample),
    }
    if not np.array_equal(np.asarray(ways["pillow"]()), np.asarray(ways["split"]())):
        raise SystemExit(f"the two ways disagree on {source[0]}x{source[1]}")
    best = _alternating_ms(ways, seconds)
    return {
        "source": list(source),
        "resized": list(plan.resized),
        "pillow_ms": round(best["pillow"], 4),
        "split_ms": round(best["split"], 4),
        "ratio": round(best["pillow"] / best["split"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=_sizes(DEFAULT_SIZES), help="WxH,...")
    parser.add_argument("--resolution", type=int, default=224, help="crop side")
    parser.add_argument(
        "--interpolation", choices=sorted(INTERPOLATIONS), default="bicubic", help="filter"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per source size")
    args = parser.parse_args(argv)
    if args.resolution < 1 or args.seconds <= 0:
        parser.error("--resolution and --seconds must be positive")
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
