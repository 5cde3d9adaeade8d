"""CPU cost of turning queued 8-bit images into the float32 batch that onnxruntime reads.

    python -m bench.batch_assembly                      # 224x224, batches of 32
    python -m bench.batch_assembly --size 448x320 --batch 8 --decode-processes 2

Two ways, timed in the same run on the same images:

* ``fresh`` (the service before 2026-11-27): each image normalised into a new float32 array as
  it arrives (``service.preprocess.normalize``); the batch stacked into another new array. A
  window of ``--queued`` normalised images stays alive, as in the batcher's queue.
* ``reused`` (the service now): the batch normalised row by row into a buffer kept from one
  call to the next (``service.batcher.PixelBuffers`` and
  ``service.preprocess.normalize_into``).

With ``--decode-processes N`` it also times the service's side of one image's round trip
through N decode worker processes (a flat-colour JPEG, so that the workers stay cheap): CPU of
this process per image, in waves of ``--queued`` images. Prints one JSON object; the two
assembly figures are CPU milliseconds per image (``time.process_time``), and ``ratio`` is
fresh / reused.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import wait

import numpy as np
from PIL import Image

from models.contract import PreprocessingRecipe
from service.batcher import PixelBuffers
from service.decode_pool import DecodeProcesses
from service.prepare import PrepareSpec
from service.preprocess import normalize, normalize_into


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WxH: {text!r}") from None
    if min(width, height) < 1:
        raise argparse.ArgumentTypeError(f"sides must be positive: {text!r}")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _cpu_ms_per_image(run: Callable[[], int], seconds: float) -> float:
    """Repeat ``run`` (which returns the images it handled) for about ``seconds``."""
    run()  # warm-up
    images, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        images += run()
    return 1e3 * (time.process_time() - cpu) / images


def assembly(size: tuple[int, int], batch: int, queued: int, seconds: float) -> dict[str, float]:
    """CPU ms per image of both ways of building batches of ``batch`` images."""
    width, height = size
    recipe = PreprocessingRecipe.for_resolution(min(width, height))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch)]
    window: deque[np.ndarray] = deque(maxlen=max(queued, batch))
    buffers = PixelBuffers()

    def fresh() -> int:
        for rgb in images:
            window.append(normalize(rgb, recipe))
        stacked = np.stack(list(window)[-batch:])  # (B, 3, H, W)
        return len(stacked)

    def reused() -> int:
        out = buffers.get(batch, height, width)
        return len(normalize_into(out, images, recipe))

    expected = np.stack([normalize(rgb, recipe) for rgb in images])
    if not np.array_equal(
        normalize_into(buffers.get(batch, height, width), images, recipe), expected
    ):
        raise AssertionError("the reused buffer's batch differs from the stacked one")
    fresh_ms = _cpu_ms_per_image(fresh, seconds)
    reused_ms = _cpu_ms_per_image(reused, seconds)
    return {"fresh_ms": fresh_ms, "reused_ms": reused_ms, "ratio": fresh_ms / reused_ms}


def round_trip(processes: int, queued: int, images: int) -> dict[str, float]:
    """This process's CPU ms (and wall ms) per image sent through ``processes`` workers."""
    spec = PrepareSpec(
        recipe=PreprocessingRecipe.for_resolution(224),
        resolution=224,
        crop="center",
        patch_size=16,
        num_heads=6,
        max_side=1024,
        max_image_pixels=10**8,
        jpeg_draft=False,
        max_attention_bytes=1 << 30,
    )
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 20, 30)).save(buffer, "JPEG")
    data = buffer.getvalue()
    pool = DecodeProcesses(processes, timeout_s=60.0)
    pool.start()
    try:
        wait([pool.executor.submit(pool.prepare, data, i, spec) for i in range(queued)])
        done, started, cpu = 0, time.perf_counter(), time.process_time()
        while done < images:
            futures = [pool.executor.submit(pool.prepare, data, i, spec) for i in range(queued)]
            wait(futures)
            for future in futures:
                future.result()  # raises what a worker raised
            done += len(futures)
        wall = time.perf_counter() - started
        return {
            "processes": processes,
            "images": done,
            "cpu_ms_per_image": 1e3 * (time.process_time() - cpu) / done,
            "wall_ms_per_image": 1e3 * wall / done,
        }
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=(224, 224), help="image WxH")
    parser.add_argument("--batch", type=_positive, default=32, help="images per batch")
    parser.add_argument("--queued", type=_positive, default=64, help="images waiting at once")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per way")
    parser.add_argument("--decode-processes", type=int, default=0, help="0: no round trip")
    parser.add_argument("--round-trip-images", type=_positive, default=2000)
    args = parser.parse_args(argv)
    report: dict[str, object] = {
        "size": list(args.size),
        "batch": args.batch,
        "assembly": assembly(args.size, args.batch, args.queued, args.seconds),
    }
    if args.decode_processes > 0:
        report["round_trip"] = round_trip(
            args.decode_processes, args.queued, args.round_trip_images
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
