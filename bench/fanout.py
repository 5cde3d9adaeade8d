"""What handing a request's images to worker threads costs the event loop.

    python -m bench.fanout                          # 8 requests of 8 images at a time
    python -m bench.fanout --images-per-request 1 --concurrency 64

Two ways, on the same threads count and in the same run, for ``--concurrency`` requests in
flight, each of ``--images-per-request`` images whose job is a tiny Python function (so that
the hand-over is what is measured):

* ``executor`` (the service before 2026-11-27): ``loop.run_in_executor`` per image on a
  ``ThreadPoolExecutor``, then ``asyncio.gather``.
* ``fanout`` (the service now): :meth:`service.fanout.Fanout.map`, one queue put per image and
  one wake-up of the event loop per request.

For each: CPU of the event loop's thread and of the whole process, per image, and the
wall-clock per image. ``ratio`` is executor / fanout. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from service.fanout import Fanout


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _job(item: int) -> int:
    """A job that costs the worker thread little: the hand-over dominates."""
    return item * 2 + 1


async def _drive(
    request: Callable[[list[int]], Awaitable[list[object]]],
    *,
    concurrency: int,
    per_request: int,
    images: int,
) -> dict[str, float]:
    """Keep ``concurrency`` requests in flight until ``images`` images are done."""
    items = list(range(per_request))
    done = 0

    async def client() -> None:
        nonlocal done
        while done < images:
            done += per_request
            outcomes = await request(items)
            if outcomes != [_job(i) for i in items]:
                raise AssertionError(f"wrong outcomes: {outcomes!r}")

    for _ in range(3):  # warm-up: threads started, code paths taken
        await request(items)
    done = 0
    wall, loop_cpu, cpu = time.perf_counter(), time.thread_time(), time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {
        "images": done,
        "loop_cpu_us_per_image": 1e6 * (time.thread_time() - loop_cpu) / done,
        "cpu_us_per_image": 1e6 * (time.process_time() - cpu) / done,
        "wall_us_per_image": 1e6 * (time.perf_counter() - wall) / done,
    }


async def _executor_way(threads: int, **kw: int) -> dict[str, float]:
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-executor")
    loop = asyncio.get_running_loop()

    async def request(items: list[int]) -> list[object]:
        jobs = [loop.run_in_executor(pool, _job, item) for item in items]
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    try:
        return await _drive(request, **kw)
    finally:
        pool.shutdown(wait=True)


async def _fanout_way(threads: int, **kw: int) -> dict[str, float]:
    fanout = Fanout(threads, name="bench-fanout")
    try:
        return await _drive(functools.partial(fanout.map, _job), **kw)
    finally:
        fanout.close(wait=True)


def compare(threads: int, concurrency: int, per_request: int, images: int) -> dict[str, object]:
    """Both ways, executor first, then fanout, then each once more; the better run of each."""
    kw = {"concurrency": concurrency, "per_request": per_request, "images": images}
    runs: dict[str, list[dict[str, float]]] = {"executor": [], "fanout": []}
    for _ in range(2):
        runs["executor"].append(asyncio.run(_executor_way(threads, **kw)))
        runs["fanout"].append(asyncio.run(_fanout_way(threads, **kw)))
    best = {way: min(r, key=lambda x: x["loop_cpu_us_per_image"]) for way, r in runs.items()}
    ratio = {
        key: best["executor"][key] / best["fanout"][key]
        for key in ("loop_cpu_us_per_image", "cpu_us_per_image", "wall_us_per_image")
        if best["fanout"][key] > 0
    }
    return {**best, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=_positive, default=4, help="worker threads")
    parser.add_argument("--concurrency", type=_positive, default=8, help="requests in flight")
    parser.add_argument("--images-per-request", type=_positive, default=8)
    parser.add_argument("--images", type=_positive, default=40_000, help="images per run")
    args = parser.parse_args(argv)
    report = {
        "threads": args.threads,
        "concurrency": args.concurrency,
        "images_per_request": args.images_per_request,
        **compare(args.threads, args.concurrency, args.images_per_request, args.images),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
