"""How long the inference thread takes to put a batch together, alone and in a busy process.

    python -m bench.batch_assembly                      # 224x224, batches of 32
    python -m bench.batch_assembly --size 448x320 --batch 8 --decode-processes 2

Two ways, timed in the same run on the same normalised images:

* ``stack`` (the service before 2026-11-27): ``np.stack`` into a new array. Numpy releases the
  GIL for every image it copies.
* ``copy`` (the service now): :func:`service.batcher.copy_rows` into a buffer kept from one
  call to the next (:class:`service.batcher.PixelBuffers`); the copies keep the GIL.

Each is timed alone and beside ``--busy-threads`` threads running Python (as the event loop and
the dispatch threads do in a loaded service): every release of the GIL may then cost up to
Python's switch interval (5 ms) before the thread gets it back. ``ratio`` is stack / copy, in
milliseconds per batch (wall-clock).

With ``--decode-processes N`` it also times the service's side of one image's round trip
through N decode worker processes (a flat-colour JPEG, so that the workers stay cheap): CPU of
this process per image, in waves of ``--queued`` images handed over as the service hands over a
request's images (one :meth:`service.fanout.Fanout.map` call). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from models.contract import PreprocessingRecipe
from service.batcher import PixelBuffers, copy_rows
from service.decode_pool import DecodeProcesses
from service.prepare import PrepareSpec
from service.preprocess import normalize


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


def _ms_per_call(run: Callable[[], object], seconds: float) -> float:
    """Repeat ``run`` for about ``seconds`` (at least 3 times): wall milliseconds per call."""
    run()  # warm-up
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        run()
        calls += 1
    return 1e3 * (time.perf_counter() - started) / calls


def _busy(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for value in range(1000):
            total += value


def assembly(
    size: tuple[int, int], batch: int, busy_threads: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Milliseconds per batch of both ways, alone and beside ``busy_threads`` busy threads."""
    width, height = size
    recipe = PreprocessingRecipe.for_resolution(min(width, height))
    rng = np.random.default_rng(0)
    rows = [
        normalize(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), recipe)
        for _ in range(batch)
    ]
    buffers = PixelBuffers()

    def stack() -> np.ndarray:
        return np.stack(rows)  # (B, 3, H, W)

    def copy() -> np.ndarray:
        out = buffers.get(batch, height, width)
        copy_rows(out, rows)
        return out

    if not np.array_equal(stack(), copy()):
        raise AssertionError("the copied batch differs from the stacked one")
    report = {
        "alone": {"stack_ms": _ms_per_call(stack, seconds), "copy_ms": _ms_per_call(copy, seconds)}
    }
    stop = threading.Event()
    threads = [threading.Thread(target=_busy, args=(stop,)) for _ in range(busy_threads)]
    for thread in threads:
        thread.start()
    try:
        report["busy"] = {
            "stack_ms": _ms_per_call(stack, seconds),
            "copy_ms": _ms_per_call(copy, seconds),
        }
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    for times in report.values():
        times["ratio"] = times["stack_ms"] / times["copy_ms"]
    return report


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

    def prepare(index: int) -> object:
        return pool.prepare(data, index, spec)

    async def wave() -> int:  # as the service hands over a request's images
        outcomes = await pool.threads.map(prepare, range(queued))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # what a worker raised
        return len(outcomes)

    async def waves() -> dict[str, float]:
        await wave()
        done, started, cpu = 0, time.perf_counter(), time.process_time()
        while done < images:
            done += await wave()
        wall = time.perf_counter() - started
        return {
            "processes": processes,
            "images": done,
            "cpu_ms_per_image": 1e3 * (time.process_time() - cpu) / done,
            "wall_ms_per_image": 1e3 * wall / done,
        }

    try:
        return asyncio.run(waves())
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=(224, 224), help="image WxH")
    parser.add_argument("--batch", type=_positive, default=32, help="images per batch")
    parser.add_argument("--busy-threads", type=_positive, default=1, help="busy Python threads")
    parser.add_argument("--queued", type=_positive, default=64, help="round trip: wave size")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per way and condition")
    parser.add_argument("--decode-processes", type=int, default=0, help="0: no round trip")
    parser.add_argument("--round-trip-images", type=_positive, default=2000)
    args = parser.parse_args(argv)
    report: dict[str, object] = {
        "size": list(args.size),
        "batch": args.batch,
        "busy_threads": args.busy_threads,
        "assembly": assembly(args.size, args.batch, args.busy_threads, args.seconds),
    }
    if args.decode_processes > 0:
        report["round_trip"] = round_trip(
            args.decode_processes, args.queued, args.round_trip_images
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
