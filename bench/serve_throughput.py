"""End-to-end throughput of the feature service over HTTP, next to the raw ONNX session.

Starts ``python -m service`` on a loopback port with a model repository, uploads JPEGs at
several client concurrencies (CLS only and CLS+patch+attention, json and base64 encodings),
and reports images/s with p50/p99 latency. In the same run it times the bare onnxruntime
session on batches of the sizes the service actually formed (read from its batch-size
histogram) on the same preprocessed pixels, and prints the ratio service / raw; and, beside
it, the session at ``--max-batch-size`` (the device at its best: replicas form smaller batches
and run concurrently, which one session at their batch size does not). The JSON
report also holds, per level, the mean of each ``Server-Timing`` stage the service reported
(read, decode, queue, infer, session, encode, total).

The load comes from several client processes, since one Python process of httpx clients tops out
at a few hundred requests/s (about 6.5 ms of its CPU per request) and would measure itself
rather than a fast service. ``--client-processes auto`` (the default) runs
``min(concurrency, max(1, os.cpu_count() // 4))`` processes per level: one on a machine with
fewer than 8 CPUs, 4 on 16. A level's workers (one connection each) and its ``--requests``
are split as evenly as possible over the processes (the requests in proportion to their
workers). With one process the load runs in the bench's own; with more, all are spawned (the
bench only coordinates), create their connections and then start together, so their start-up
is not measured.
Their latencies, stage times, failures and counts are merged, and images/s is all successful
images over the level's wall time. Each request uploads ``--images-per-request`` images
(default 1; images/s counts images). The report gives, per level, the client processes, the
client's CPU time per request and how busy it kept its cores (near 1: the client is the
limit, not the service). ``--replicas N`` starts N service processes on their own ports (the
deployment the README suggests for more than one process's worth of requests per GPU); the
workers take them in turn, as a load balancer would, and the report counts each replica's
inferred images from its own ``/metrics``. ``--decode-processes N`` sets
``DINO_DECODE_PROCESSES`` (decoding in N worker processes). Each row also gives the server's
own CPU time per image, main process only (Linux, from ``/proc``): with decode processes this
is what remains of the work that shares one GIL, the figure that caps one process.

The bench also checks answers while it times them: every ``--check-every``-th request of a
client (default 4; 0: none) has its CLS embeddings compared with the raw session's for the same
JPEGs (cosine similarity at least 0.999, which batch-size and kernel differences stay far
above, and nearer its own image's than any other image's of the request). A wrong answer
counts as a failed request (``wrong_answer``), so a fast service that serves the wrong numbers
does not pass for a fast one.

Examples:
    python bench/serve_throughput.py --tiny                 # seconds, for a smoke run
    python bench/serve_throughput.py                        # vit_small/16, random weights
    python bench/serve_throughput.py --model-repository model_repository --model-name dino_default
    python bench/serve_throughput.py --device cuda --client-processes 8 --images-per-request 4
    python bench/serve_throughput.py --device cuda --replicas 4
    python bench/serve_throughput.py --device cuda --images-per-request 8 --decode-processes 12
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

from models.contract import CLS_EMBEDDING, OUTPUT_NAMES, PIXEL_VALUES, model_path, model_versions
from service.decode import decode_image
from service.preprocess import plan_geometry, to_pixels
from service.runtime import parse_metadata, requested_providers


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def server_command(switch_interval_ms: float | None, module: str = "service") -> list[str]:
    """The command line of one service process: ``python -m service``, or, with a switch
    interval, the same module run after ``sys.setswitchinterval``."""
    if switch_interval_ms is None:
        return [sys.executable, "-m", module]
    code = (
        f"import runpy, sys; sys.setswitchinterval({switch_interval_ms / 1000!r}); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code]


def _processes_option(text: str) -> int | None:
    """``auto`` (None: the rule of :func:`_auto_processes`) or a count of at least 1."""
    return None if text == "auto" else _positive_int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, help="existing repository to serve")
    parser.add_argument("--model-name", default="dino_default")
    parser.add_argument("--tiny", action="store_true", help="export and serve a tiny ViT")
    parser.add_argument("--arch", default="vit_small", help="architecture for the fresh export")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="most requests per level, over all client processes (default: as many as "
        "--seconds allows)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="time per level")
    parser.add_argument(
        "--client-processes",
        type=_processes_option,
        default=None,
        metavar="N|auto",
        help="client processes per level, each with its share of the level's workers "
        "(default auto: min(concurrency, max(1, cpu_count // 4)), so 1 below 8 CPUs)",
    )
    parser.add_argument(
        "--images-per-request",
        type=_positive_int,
        default=1,
        metavar="K",
        help="images uploaded by each request (default 1); images/s counts images",
    )
    parser.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        metavar="N",
        help="service processes to start, each on its own port; the client workers take them "
        "in turn, as a load balancer would (default 1)",
    )
    parser.add_argument(
        "--decode-processes",
        type=int,
        default=None,
        metavar="N",
        help="DINO_DECODE_PROCESSES for the service (default: the environment's, else 0: "
        "decode in threads)",
    )
    parser.add_argument(
        "--server-switch-interval-ms",
        type=_positive_float,
        default=None,
        metavar="MS",
        help="an experiment: Python's thread switch interval in the service processes "
        "(sys.setswitchinterval; Python's default 5 ms), how long a thread that wants the GIL "
        "may wait for the one holding it",
    )
    parser.add_argument(
        "--raw-seconds",
        type=float,
        default=3.0,
        help="time of the raw session after each level (default 3)",
    )
    parser.add_argument("--image-size", default="400x300", help="JPEG upload size WxH")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument(
        "--check-every",
        type=_non_negative_int,
        default=4,
        metavar="N",
        help="compare the CLS embeddings of every N-th request of each client with the raw "
        "session's (default 4; 0: never)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON report here")
    return parser


def _export(workdir: Path, *, tiny: bool, arch: str, patch_size: int) -> tuple[Path, str]:
    """Export a random-weight model into a fresh repository (imports torch: bench only)."""
    import torch

    from models.export import export_to_repository
    from models.vit import VisionTransformer, ViTConfig, vit_config

    torch.manual_seed(0)
    if tiny:
        config = ViTConfig(
            patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32, arch="custom"
        )
        resolution = 32
    else:
        config = vit_config(arch, patch_size)
        resolution = 224
    repository = workdir / "model_repository"
    print(f"exporting {config.arch}/{config.patch_size} (random weights) ...", file=sys.stderr)
    export_to_repository(
        VisionTransformer(config).eval(),
        repository,
        "bench",
        resolution=resolution,
        weights_sha256="0" * 64,
        source="bench: random weights",
    )
    return repository, "bench"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open until each is known)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _jpegs(size: tuple[int, int], count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    blobs = []
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(count):
        base = np.stack([np.sin(x / (9 + i) + c) * 100 + 128 for c in range(3)], -1)
        noise = rng.normal(0, 12, base.shape)
        rgb = np.clip(base + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def _histogram(text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("dino_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("dino_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


def _server_timing(header: str, totals: dict[str, float]) -> None:
    """Add the ``name;dur=<ms>`` entries of a ``Server-Timing`` header to ``totals``."""
    for entry in header.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name and duration:
            totals[name] = totals.get(name, 0.0) + float(duration)


@dataclass(frozen=True)
class _ClientJob:
    """What one client process does during a level (pickled into a spawned process)."""

    urls: list[str]  # the service replicas; worker k of the level talks to urls[k % len]
    first_worker: int  # this process's first worker, counted over the whole level
    blobs: list[bytes]
    params: dict[str, str]
    workers: int  # concurrent requests, one connection each
    requests: int | None  # most requests this process starts; None: until the deadline
    seconds: float
    images_per_request: int
    first_blob: int  # where this process starts in the blob pool
    expected: list[np.ndarray] | None = None  # the raw session's CLS embedding of each blob
    check_every: int = 0  # compare every n-th request's CLS embeddings with ``expected``


@dataclass
class _ClientResult:
    """The raw figures of one client process, merged by :func:`_merge`."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    stage_totals: dict[str, float] = field(default_factory=dict)  # Server-Timing ms, summed
    failures: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # HTTP status or transport error
    first_failure: str | None = None
    attempted: int = 0  # requests started, successful or not
    started: float = 0.0  # time.time() when the workers started
    finished: float = 0.0  # time.time() when the last answer arrived
    cpu_s: float = 0.0  # time.process_time() of this process while its workers ran


async def _client_level(job: _ClientJob, wait_for_start: Callable[[], float]) -> _ClientResult:
    """Run ``job.workers`` concurrent upload loops from a common start until the deadline.

    Args:
        job: The level's share of this process.
        wait_for_start: Called once the clients exist; returns the ``time.time()`` at which
            every process starts (blocking until then is fine: no request is in flight).

    Returns:
        The raw latencies, stage totals, failures and timings of this process.
    """
    result = _ClientResult()
    limit = job.requests if job.requests is not None else math.inf
    per_request = job.images_per_request
    next_index = 0
    # One client (one connection) per worker: a pool shared by 64 workers cost the client
    # 9-10 ms of CPU per request against 6.5 ms, and the bench then measured itself. Even so
    # one process tops out at a few hundred requests/s, hence several client processes.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=job.urls[(job.first_worker + k) % len(job.urls)],
                    timeout=120,
                    limits=limits,
                )
            )
            for k in range(job.workers)
        ]
        start_at = wait_for_start()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + job.seconds - max(0.0, time.time() - start_at)

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal next_index
            while next_index < limit and time.perf_counter() < deadline:
                index = next_index
                first = job.first_blob + index * per_request
                files = [
                    ("images", ("i.jpg", job.blobs[(first + i) % len(job.blobs)], "image/jpeg"))
                    for i in range(per_request)
                ]
                next_index += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/embed", files=files, params=job.params)
                    await response.aread()
                except httpx.TransportError as err:  # a failure of this request, not the run
                    key = type(err).__name__
                    _count_failure(result, key, f"{key}: {err}"[:300])
                    continue
                checked = job.expected is not None and job.check_every > 0
                if response.status_code == 200 and checked and index % job.check_every == 0:
                    wanted = [
                        job.expected[(first + i) % len(job.expected)] for i in range(per_request)
                    ]
                    wrong = check_answer(response.content, wanted)
                    if wrong is not None:
                        _count_failure(result, "wrong_answer", f"wrong_answer: {wrong}"[:300])
                        continue
                if response.status_code == 200:
                    result.latencies.append(time.perf_counter() - started)
                    _server_timing(response.headers.get("server-timing", ""), result.stage_totals)
                else:
                    key = str(response.status_code)
                    _count_failure(result, key, f"{key}: {response.text[:300]}")

        result.started = time.time()
        cpu_before = time.process_time()
        await asyncio.gather(*(worker(client) for client in clients))
        result.cpu_s = time.process_time() - cpu_before
        result.finished = time.time()
    result.attempted = next_index
    return result


def check_answer(body: bytes, expected: list[np.ndarray], min_cosine: float = 0.999) -> str | None:
    """Compare the CLS embeddings of an ``/embed`` answer with ``expected`` (one per image).

    Each answer must have a cosine similarity of at least ``min_cosine`` with its own expected
    embedding, and be closer to it than to that of any other image of the request (random
    weights can make two different images' embeddings nearly parallel).

    Args:
        body: The answer (json or base64 encoding; float32 or float16).
        expected: The raw session's CLS embedding of each uploaded image, in order.
        min_cosine: Least cosine similarity accepted.

    Returns:
        None when every image matches, else what is wrong.
    """
    try:
        results = json.loads(body)["results"]
        if len(results) != len(expected):
            return f"{len(results)} results for {len(expected)} images"
        for position, item in enumerate(results):
            got = _embedding(item["cls_embedding"])
            if got.shape != expected[position].shape:
                return f"image {position}: shape {got.shape}, expected {expected[position].shape}"
            cosines = [_cosine(got, want) for want in expected]
            own = cosines[position]
            if not own >= min_cosine:  # NaN fails too
                return f"image {position}: cosine similarity {own:.6f} with the raw session"
            nearest = max(range(len(cosines)), key=lambda k: (cosines[k], k == position))
            if nearest != position:
                return f"image {position}: closer to image {nearest} of the request ({own:.6f})"
    except (ValueError, KeyError, TypeError) as err:
        return f"an answer that cannot be read: {err!r}"
    return None


def _embedding(value: Any) -> np.ndarray:
    """One ``cls_embedding`` of an answer as a flat float64 array."""
    if isinstance(value, dict):  # base64: little-endian raw array
        dtype = np.dtype(value["dtype"]).newbyteorder("<")
        return np.frombuffer(base64.b64decode(value["data"]), dtype=dtype).astype(np.float64)
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms > 0 else 0.0


def _count_failure(result: _ClientResult, key: str, message: str) -> None:
    result.failures += 1
    result.statuses[key] = result.statuses.get(key, 0) + 1
    result.first_failure = result.first_failure or message


def _client_process(conn: Connection, job: _ClientJob) -> None:
    """Entry point of a spawned client process: the handshake, the level, the result.

    Sends ``("ready", None)`` once its clients exist, receives the common start time, runs
    the level and sends ``("result", _ClientResult)``, or ``("error", traceback)`` and exits
    with status 1 when anything raised.

    Args:
        conn: This process's end of the pipe to the parent.
        job: The level's share of this process.
    """

    def wait_for_start() -> float:
        conn.send(("ready", None))
        start_at: float = conn.recv()
        return start_at

    try:
        result = asyncio.run(_client_level(job, wait_for_start))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        sys.exit(1)
    conn.send(("result", result))


def _split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares as even as possible, the larger ones first.

    Args:
        total: What is shared (workers or requests), at least 0.
        parts: How many shares, at least 1.

    Returns:
        ``parts`` integers summing to ``total``, differing by at most one (64, 3 -> 22, 21, 21).
    """
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _split_workers(concurrency: int, processes: int) -> list[int]:
    """The workers of each client process: never a process without one.

    Args:
        concurrency: Concurrent requests of the level, at least 1.
        processes: Client processes asked for, at least 1.

    Returns:
        ``min(processes, concurrency)`` worker counts summing to ``concurrency``.
    """
    return _split(concurrency, min(processes, concurrency))


def _split_requests(requests: int, workers: list[int]) -> list[int]:
    """``--requests`` over the client processes, in proportion to their workers.

    Each worker gets an even share (:func:`_split`), and a process the sum of its workers'
    shares, so no process runs on alone with fewer workers after the others are done.

    Args:
        requests: Most requests of the level in all, at least 0.
        workers: The workers of each process (:func:`_split_workers`).

    Returns:
        The most requests of each process, summing to ``requests``.
    """
    per_worker = _split(requests, sum(workers))
    shares, start = [], 0
    for count in workers:
        shares.append(sum(per_worker[start : start + count]))
        start += count
    return shares


def _auto_processes(concurrency: int, cpu_count: int | None = None) -> int:
    """The ``--client-processes auto`` rule: ``min(concurrency, max(1, cpus // 4))``.

    Args:
        concurrency: Concurrent requests of the level.
        cpu_count: CPUs of the machine (default ``os.cpu_count()``).

    Returns:
        Client processes for the level: a quarter of the CPUs (the service keeps the rest),
        at least one, and no more than workers.
    """
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return min(concurrency, max(1, cpus // 4))


def _receive(
    processes: list[BaseProcess], conns: list[Connection], what: str, timeout: float
) -> list[Any]:
    """One ``what`` message from each client process, in process order.

    Raises:
        SystemExit: A process sent an error, died without sending, or sent nothing within
            ``timeout`` seconds (the others are then stopped by the caller).
    """
    pending = dict(enumerate(conns))
    received: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"client process(es) {sorted(pending)} sent no {what} in {timeout} s")
        mp_connection.wait(
            [*pending.values(), *(processes[i].sentinel for i in pending)], timeout=left
        )
        for index, conn in list(pending.items()):
            message: tuple[str, Any] | None = None
            if conn.poll():
                with contextlib.suppress(EOFError):
                    message = conn.recv()
            elif processes[index].is_alive():
                continue
            if message is None:  # the pipe closed, or the process ended, without a message
                processes[index].join(timeout=5)
                raise SystemExit(
                    f"client process {index} exited with status {processes[index].exitcode} "
                    f"before sending its {what}"
                )
            kind, payload = message
            if kind == "error":
                raise SystemExit(f"client process {index} failed:\n{payload}")
            if kind != what:
                raise SystemExit(f"client process {index} sent {kind!r}, expected {what!r}")
            received[index] = payload
            del pending[index]
    return [received[i] for i in range(len(conns))]


def _run_clients(jobs: list[_ClientJob]) -> list[_ClientResult]:
    """Run one level's jobs: in this process for one job, else one spawned process each.

    Spawned processes (not forked: this process holds onnxruntime and httpx threads) first
    create their clients and report ready; then they all get a start time a moment ahead, so
    their start-up is not measured.

    Args:
        jobs: One per client process.

    Returns:
        Each process's raw result, in job order.

    Raises:
        SystemExit: A client process failed, crashed or hung (it is stopped, not waited for).
    """
    if len(jobs) == 1:
        return [asyncio.run(_client_level(jobs[0], time.time))]
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    conns: list[Connection] = []
    try:
        for job in jobs:
            parent_end, child_end = context.Pipe()
            child = context.Process(target=_client_process, args=(child_end, job), daemon=True)
            child.start()
            child_end.close()  # so that a dead child reads as EOF here
            processes.append(child)
            conns.append(parent_end)
        _receive(processes, conns, "ready", timeout=120)
        start_at = time.time() + 0.2
        for conn in conns:
            with contextlib.suppress(OSError):  # a process gone since: _receive names it
                conn.send(start_at)
        # requests time out after 120 s on the client; the deadline only stops new ones
        results: list[_ClientResult] = _receive(
            processes, conns, "result", timeout=jobs[0].seconds + 180
        )
        for process in processes:
            process.join(timeout=30)
        return results
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join()
        for conn in conns:
            conn.close()


def _merge(results: list[_ClientResult], images_per_request: int) -> dict[str, Any]:
    """Merge the client processes' raw results into one level's figures.

    Args:
        results: One per client process.
        images_per_request: Images each request uploaded.

    Returns:
        The level's requests, failures, images/s over the whole level's wall time (first start
        to last answer), p50/p99 over all latencies, mean Server-Timing stages per successful
        request and the client's CPU time per request.
    """
    latencies = sorted(value for result in results for value in result.latencies)
    stage_totals: dict[str, float] = {}
    statuses: dict[str, int] = {}
    for result in results:
        for name, total in result.stage_totals.items():
            stage_totals[name] = stage_totals.get(name, 0.0) + total
        for key, count in result.statuses.items():
            statuses[key] = statuses.get(key, 0) + count
    wall = max(r.finished for r in results) - min(r.started for r in results)
    attempted = sum(r.attempted for r in results)
    cpu_s = sum(r.cpu_s for r in results)
    done = max(len(latencies), 1)
    return {
        "requests": len(latencies),
        "images_per_request": images_per_request,
        "client_processes": len(results),
        "client_requests": [len(r.latencies) for r in results],  # successful, per process
        # mean per request of each Server-Timing stage (read, decode, queue, infer, session,
        # encode, total)
        "server_stages_ms": {name: total / done for name, total in stage_totals.items()},
        "failures": sum(r.failures for r in results),
        "failure_statuses": statuses,
        "first_failure": next((r.first_failure for r in results if r.first_failure), None),
        "wall_s": wall,  # first process's start to the last answer
        "images_per_s": len(latencies) * images_per_request / wall if wall > 0 else 0.0,
        # None, not NaN (which strict JSON readers refuse), when no request succeeded
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
        # CPU of the client processes per request sent, and the share of their cores they
        # kept busy (near 1: the client, not the service, limits the level)
        "client_cpu_ms_per_request": 1000 * cpu_s / attempted if attempted else None,
        "client_cpu_busy": cpu_s / (wall * len(results)) if wall > 0 else None,
    }


def _level(
    urls: list[str],
    blobs: list[bytes],
    *,
    concurrency: int,
    processes: int,
    requests: int | None,
    seconds: float,
    params: dict[str, str],
    images_per_request: int,
    expected: list[np.ndarray] | None = None,
    check_every: int = 0,
) -> dict[str, Any]:
    """One level: ``concurrency`` workers over ``min(processes, concurrency)`` client processes.

    Args:
        urls: The base URLs of the service replicas (the workers take them in turn).
        blobs: JPEGs to upload, in turn.
        concurrency: Concurrent requests in all.
        processes: Client processes asked for.
        requests: Most requests in all (shared over the processes); None: until the deadline.
        seconds: Time of the level.
        params: Query parameters of each request.
        images_per_request: Images each request uploads (distinct blobs of the pool).
        expected: The raw session's CLS embedding of each blob, for the answer check.
        check_every: Check every n-th request of each client (0: none).

    Returns:
        The merged figures of :func:`_merge`.
    """
    workers = _split_workers(concurrency, processes)
    shares: list[int | None] = [None] * len(workers)
    if requests is not None:
        shares = [*_split_requests(requests, workers)]
    jobs = [
        _ClientJob(
            urls=urls,
            first_worker=sum(workers[:index]),
            blobs=blobs,
            params=params,
            workers=count,
            requests=share,
            seconds=seconds,
            images_per_request=images_per_request,
            first_blob=index * images_per_request,
            expected=expected,
            check_every=check_every,
        )
        for index, (count, share) in enumerate(zip(workers, shares, strict=True))
    ]
    return _merge(_run_clients(jobs), images_per_request)


class RawSession:
    """The bare onnxruntime session on the same file and the same preprocessed pixels."""

    def __init__(self, path: Path, blobs: list[bytes], device: str) -> None:
        # errors only, as the service: onnxruntime-gpu 1.31 warns about plugin devices otherwise
        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path), options, providers=requested_providers(device)
        )
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise SystemExit("the raw session did not bind CUDAExecutionProvider")
        metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        pixels = []
        for blob in blobs:
            image = decode_image(blob, max_pixels=10**8)
            geometry = plan_geometry(
                image.width,
                image.height,
                recipe=metadata.recipe,
                resolution=metadata.resolution,
                crop="center",
                patch_size=metadata.patch_size,
                max_side=1024,
            )
            pixels.append(to_pixels(image, geometry, metadata.recipe))
        self.pixels = pixels

    def cls_embeddings(self) -> list[np.ndarray]:
        """The CLS embedding of each blob, one image per call (float64, for the answer check)."""
        return [
            self.session.run([CLS_EMBEDDING.name], {PIXEL_VALUES.name: pixels[None]})[0][0]
            .astype(np.float64)
            .reshape(-1)
            for pixels in self.pixels
        ]

    def images_per_s(self, batch: int, outputs: tuple[str, ...], seconds: float = 3.0) -> float:
        """Measured right after each HTTP level, so both see the same machine load."""
        stack = np.stack([self.pixels[i % len(self.pixels)] for i in range(batch)])
        feed = {PIXEL_VALUES.name: stack}  # (B, 3, H, W)
        self.session.run(list(outputs), feed)  # warm-up for this shape
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or runs < 3:
            self.session.run(list(outputs), feed)
            runs += 1
        return runs * batch / (time.perf_counter() - started)


_HEADER = (
    f"{'outputs':>20} {'enc':>6} {'conc':>4} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'batch':>6} {'raw img/s':>10} {'ratio':>6} {'full/s':>8} {'ratio':>6} {'fail':>4} "
    f"{'procs':>5} {'cli ms':>6} {'busy':>4} {'srv ms':>6}"
)


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) of one process, without its children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None  # not Linux, or the process has gone
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)


def _cpu_ms_per_image(
    before: list[float | None], after: list[float | None], images: float
) -> float | None:
    """Main-process CPU milliseconds per image over a level, all replicas together."""
    if images <= 0 or any(v is None for v in (*before, *after)):
        return None
    spent = sum(
        a - b for a, b in zip(after, before, strict=True) if a is not None and b is not None
    )
    return 1000.0 * spent / images


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['outputs']:>20} {row['encoding']:>6} {row['concurrency']:>4} "
        f"{row['images_per_s']:8.1f} {_number(row['p50_ms'], 8, 1)} "
        f"{_number(row['p99_ms'], 8, 1)} {row['mean_batch']:6.1f} "
        f"{_number(row['raw_images_per_s'], 10, 1)} {_number(row['ratio'], 6, 2)} "
        f"{_number(row['raw_full_batch_images_per_s'], 8, 1)} "
        f"{_number(row['ratio_full_batch'], 6, 2)} {row['failures']:>4} "
        f"{row['client_processes']:>5} "
        f"{_number(row['client_cpu_ms_per_request'], 6, 2)} "
        f"{_number(row['client_cpu_busy'], 4, 2)} "
        f"{_number(row.get('server_cpu_ms_per_image'), 6, 2)}"
    )


def _hardware(provider: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if provider.startswith("CUDA"):
        try:
            gpu = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                ).stdout.strip()
                or None
            )
        except OSError:
            gpu = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "execution_provider": provider,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def _stop(servers: list[subprocess.Popen[bytes]]) -> None:
    """Stop the services: SIGTERM, 30 s for all of them, then SIGKILL for any left.

    The kill also runs when the wait is interrupted (a second Ctrl-C), and the error that got
    us here is never hidden by a stop that fails.
    """
    for server in servers:
        server.terminate()
    deadline = time.monotonic() + 30
    try:
        for server in servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait()


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    """SIGTERM as Ctrl-C: unwinds, so the client processes and the service are stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    except ValueError:
        parser.error(f"argument --concurrency: not comma-separated integers: {args.concurrency!r}")
    if not levels or min(levels) < 1:
        parser.error(f"argument --concurrency: levels must be at least 1: {args.concurrency!r}")
    per_request = args.images_per_request
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="dino-bench-") as tmp:
        if args.model_repository is None:
            repository, name = _export(
                Path(tmp), tiny=args.tiny, arch=args.arch, patch_size=args.patch_size
            )
        else:
            repository, name = args.model_repository, args.model_name
        versions = model_versions(repository, name)
        if not versions:
            print(f"no versions of {name!r} in {repository}", file=sys.stderr)
            return 2
        ports = _free_ports(args.replicas)
        # The queue must hold one request of the caller's own per-request limit, if any (the
        # service refuses to start otherwise; a non-number is its to report).
        given = os.environ.get("DINO_MAX_IMAGES_PER_REQUEST", "").strip()
        caller_limit = int(given) if given.isdigit() else 0
        env = {
            **os.environ,
            "DINO_HOST": "127.0.0.1",
            "DINO_MODEL_REPOSITORY": str(repository),
            "DINO_MODEL_NAME": name,
            "DINO_DEVICE": args.device,
            "DINO_MAX_BATCH_SIZE": str(args.max_batch_size),
            "DINO_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
            "DINO_MAX_QUEUE_IMAGES": str(max(256, 2 * max(levels) * per_request, caller_limit)),
            "DINO_POLL_INTERVAL_S": "0",
            "DINO_LOG_LEVEL": "warning",
        }
        # The service's per-request limits follow --images-per-request, unless the caller set
        # them: a dense JSON answer of ViT-S/16 at 224 is about 1.8 MiB per image.
        if "DINO_MAX_IMAGES_PER_REQUEST" not in os.environ:
            env["DINO_MAX_IMAGES_PER_REQUEST"] = str(max(32, per_request))
        if args.decode_processes is not None:
            env["DINO_DECODE_PROCESSES"] = str(args.decode_processes)
        if "DINO_MAX_RESPONSE_BYTES" not in os.environ:
            env["DINO_MAX_RESPONSE_BYTES"] = str(max(64, 4 * per_request) * 2**20)
        servers: list[subprocess.Popen[bytes]] = []
        try:
            for port in ports:
                servers.append(
                    subprocess.Popen(
                        server_command(args.server_switch_interval_ms),
                        env={**env, "DINO_PORT": str(port)},
                    )
                )
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            report = _run(
                urls, servers, args, levels, (width, height), repository, name, versions[-1]
            )
        finally:
            _stop(servers)
    print(json.dumps(report["hardware"]))
    print(_HEADER)
    for row in report["results"]:
        print(_format_row(row))
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    failed = [row for row in report["results"] if row["failures"]]
    for row in failed:
        print(
            f"{row['failures']} failed request(s) at {row['outputs']}/{row['encoding']}/"
            f"{row['concurrency']}: {row['failure_statuses']}; first: {row['first_failure']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _run(
    urls: list[str],
    servers: list[subprocess.Popen[bytes]],
    args: argparse.Namespace,
    levels: list[int],
    size: tuple[int, int],
    repository: Path,
    name: str,
    version: int,
) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    with httpx.Client(timeout=10) as client:
        providers = []
        for url, server in zip(urls, servers, strict=True):
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the service at {url} exited during start-up")
                try:
                    ready = client.get(f"{url}/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the service at {url} did not become ready in 300 s")
                time.sleep(0.2)
            providers.append(ready.json()["execution_provider"])
        if len(set(providers)) > 1:
            raise SystemExit(f"the replicas run on different providers: {providers}")
        provider = providers[0]

        def histograms() -> list[tuple[float, float]]:  # (images, inference calls) per replica
            counts = []
            for url in urls:
                try:
                    counts.append(_histogram(client.get(f"{url}/metrics").text))
                except httpx.TransportError as err:
                    raise SystemExit(f"the service at {url} stopped answering: {err!r}") from err
            return counts

        blobs = _jpegs(size, max(16, args.images_per_request))  # distinct within a request
        raw = RawSession(model_path(repository, name, version), blobs, args.device)
        expected = raw.cls_embeddings() if args.check_every else None
        scenarios = [
            ("cls", "cls", "json", (CLS_EMBEDDING.name,)),
            ("cls", "cls", "base64", (CLS_EMBEDDING.name,)),
            (
                "cls+patch+attention",
                "cls,patch,attention",
                "json",
                OUTPUT_NAMES,
            ),
            (
                "cls+patch+attention",
                "cls,patch,attention",
                "base64",
                OUTPUT_NAMES,
            ),
        ]
        rows = []
        for label, outputs, encoding, names in scenarios:
            for concurrency in levels:
                before = histograms()
                cpu_before = [_process_cpu_s(server.pid) for server in servers]
                params = {"outputs": outputs, "encoding": encoding}
                processes = args.client_processes or _auto_processes(concurrency)
                result = _level(
                    urls,
                    blobs,
                    concurrency=concurrency,
                    processes=processes,
                    requests=args.requests,
                    seconds=args.seconds,
                    params=params,
                    images_per_request=args.images_per_request,
                    expected=expected,
                    check_every=args.check_every,
                )
                after = histograms()
                cpu_after = [_process_cpu_s(server.pid) for server in servers]
                images = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
                calls = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
                # images per session call, whatever the images per request: the raw session
                # is timed on batches of that size
                mean_batch = sum(images) / calls if calls else 1.0
                raw_batch = max(1, round(mean_batch))
                raw_rate = full_rate = None  # nothing to compare a level without one success with
                if result["requests"]:
                    raw_rate = raw.images_per_s(raw_batch, names, args.raw_seconds)
                    # The session at the largest batch the service may form: what the device
                    # gives at its best. Several replicas each form smaller batches, and run
                    # concurrently, which one raw session at their batch size does not.
                    full_rate = (
                        raw_rate
                        if raw_batch >= args.max_batch_size
                        else raw.images_per_s(args.max_batch_size, names, args.raw_seconds)
                    )
                row = {
                    "outputs": label,
                    "encoding": encoding,
                    "concurrency": concurrency,
                    **result,
                    "server_images": round(sum(images)),  # inferred in this level
                    "replica_images": [round(value) for value in images],
                    "mean_batch": mean_batch,
                    "raw_batch": raw_batch,  # the batch size the raw session was timed on
                    "raw_images_per_s": raw_rate,
                    "ratio": result["images_per_s"] / raw_rate if raw_rate else None,
                    "full_batch": args.max_batch_size,  # the batch size full_rate was timed on
                    "raw_full_batch_images_per_s": full_rate,
                    "ratio_full_batch": result["images_per_s"] / full_rate if full_rate else None,
                    "server_cpu_ms_per_image": _cpu_ms_per_image(
                        cpu_before, cpu_after, sum(images)
                    ),
                }
                rows.append(row)
                print(_format_row(row), file=sys.stderr, flush=True)
    return {
        "hardware": _hardware(provider),
        "model": {"repository": str(repository), "name": name, "version": version},
        "image_size": list(size),
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            # None: auto, min(concurrency, max(1, cpu_count // 4)) per level
            "client_processes": args.client_processes,
            "images_per_request": args.images_per_request,
            "check_every": args.check_every,
            "replicas": args.replicas,
            "server_switch_interval_ms": args.server_switch_interval_ms,  # None: Python's
            "decode_processes": os.environ.get("DINO_DECODE_PROCESSES", "0")
            if args.decode_processes is None
            else str(args.decode_processes),
        },
        "results": rows,
        "note": "client, server and raw session share this machine; raw excludes JPEG decode",
    }


if __name__ == "__main__":
    # Only as a script: main() called from other code (the tests) leaves its signals alone.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, once everything it started is stopped
        print("stopped", file=sys.stderr)
        sys.exit(130)
