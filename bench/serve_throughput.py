"""End-to-end throughput of the feature service over HTTP, next to the raw ONNX session.

Starts ``python -m service`` on a loopback port with a model repository, uploads JPEGs at
several client concurrencies (CLS only and CLS+patch+attention, json and base64 encodings),
and reports images/s with p50/p99 latency. In the same run it times the bare onnxruntime
session on batches of the sizes the service actually formed (read from its batch-size
histogram) on the same preprocessed pixels, and prints the ratio service / raw. The JSON
report also holds, per level, the mean of each ``Server-Timing`` stage the service reported
(read, decode, queue, infer, encode, total).

Examples:
    python bench/serve_throughput.py --tiny                 # seconds, for a smoke run
    python bench/serve_throughput.py                        # vit_small/16, random weights
    python bench/serve_throughput.py --model-repository model_repository --model-name dino_default
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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
        help="most requests per level (default: as many as --seconds allows)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="time per level")
    parser.add_argument("--image-size", default="400x300", help="JPEG upload size WxH")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


async def _level(
    url: str,
    blobs: list[bytes],
    *,
    concurrency: int,
    requests: int | None,
    seconds: float,
    params: dict[str, str],
) -> dict[str, Any]:
    latencies: list[float] = []
    stage_totals: dict[str, float] = {}
    failures = 0
    statuses: dict[str, int] = {}  # of the failures: HTTP status, or the transport error
    first_failure: str | None = None
    next_index = 0
    limit = requests if requests is not None else math.inf
    deadline = time.perf_counter() + seconds
    # One client (one connection) per worker: a pool shared by 64 workers cost the client
    # 9-10 ms of CPU per request against 6.5 ms, and the bench then measured itself.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, timeout=120, limits=limits)
            )
            for _ in range(concurrency)
        ]

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal next_index, failures, first_failure
            while next_index < limit and time.perf_counter() < deadline:
                blob = blobs[next_index % len(blobs)]
                next_index += 1
                started = time.perf_counter()
                try:
                    response = await client.post(
                        "/embed", files=[("images", ("i.jpg", blob, "image/jpeg"))], params=params
                    )
                    await response.aread()
                except httpx.TransportError as err:  # a failure of this request, not the run
                    failures += 1
                    key = type(err).__name__
                    statuses[key] = statuses.get(key, 0) + 1
                    first_failure = first_failure or f"{key}: {err}"[:300]
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    _server_timing(response.headers.get("server-timing", ""), stage_totals)
                else:
                    failures += 1
                    key = str(response.status_code)
                    statuses[key] = statuses.get(key, 0) + 1
                    first_failure = first_failure or f"{key}: {response.text[:300]}"

        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in clients))
        wall = time.perf_counter() - started
    latencies.sort()
    done = max(len(latencies), 1)
    return {
        "requests": len(latencies),
        # mean per request of each Server-Timing stage (read, decode, queue, infer, encode)
        "server_stages_ms": {name: total / done for name, total in stage_totals.items()},
        "failures": failures,
        "failure_statuses": statuses,
        "first_failure": first_failure,
        "images_per_s": len(latencies) / wall if wall > 0 else 0.0,
        # None, not NaN (which strict JSON readers refuse), when no request succeeded
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
    }


class RawSession:
    """The bare onnxruntime session on the same file and the same preprocessed pixels."""

    def __init__(self, path: Path, blobs: list[bytes], device: str) -> None:
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
    f"{'batch':>6} {'raw img/s':>10} {'ratio':>6} {'fail':>4}"
)


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['outputs']:>20} {row['encoding']:>6} {row['concurrency']:>4} "
        f"{row['images_per_s']:8.1f} {_number(row['p50_ms'], 8, 1)} "
        f"{_number(row['p99_ms'], 8, 1)} {row['mean_batch']:6.1f} "
        f"{_number(row['raw_images_per_s'], 10, 1)} {_number(row['ratio'], 6, 2)} "
        f"{row['failures']:>4}"
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
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
        port = _free_port()
        env = {
            **os.environ,
            "DINO_HOST": "127.0.0.1",
            "DINO_PORT": str(port),
            "DINO_MODEL_REPOSITORY": str(repository),
            "DINO_MODEL_NAME": name,
            "DINO_DEVICE": args.device,
            "DINO_MAX_BATCH_SIZE": str(args.max_batch_size),
            "DINO_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
            "DINO_MAX_QUEUE_IMAGES": str(max(256, 2 * max(levels))),
            "DINO_POLL_INTERVAL_S": "0",
            "DINO_LOG_LEVEL": "warning",
        }
        server = subprocess.Popen([sys.executable, "-m", "service"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            report = _run(
                url, server, args, levels, (width, height), repository, name, versions[-1]
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # never hide the error that got us here
                server.kill()
                server.wait()
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
    url: str,
    server: subprocess.Popen[bytes],
    args: argparse.Namespace,
    levels: list[int],
    size: tuple[int, int],
    repository: Path,
    name: str,
    version: int,
) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=10) as client:
        while True:
            if server.poll() is not None:
                raise SystemExit("the service exited during start-up")
            try:
                ready = client.get("/readyz")
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become ready in 300 s")
            time.sleep(0.2)
        provider = ready.json()["execution_provider"]
        blobs = _jpegs(size, 16)
        raw = RawSession(model_path(repository, name, version), blobs, args.device)
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
                before = _histogram(client.get("/metrics").text)
                params = {"outputs": outputs, "encoding": encoding}
                result = asyncio.run(
                    _level(
                        url,
                        blobs,
                        concurrency=concurrency,
                        requests=args.requests,
                        seconds=args.seconds,
                        params=params,
                    )
                )
                after = _histogram(client.get("/metrics").text)
                calls = after[1] - before[1]
                mean_batch = (after[0] - before[0]) / calls if calls else 1.0
                raw_rate = (  # nothing to compare a level without one success with
                    raw.images_per_s(max(1, round(mean_batch)), names)
                    if result["requests"]
                    else None
                )
                row = {
                    "outputs": label,
                    "encoding": encoding,
                    "concurrency": concurrency,
                    **result,
                    "mean_batch": mean_batch,
                    "raw_images_per_s": raw_rate,
                    "ratio": result["images_per_s"] / raw_rate if raw_rate else None,
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
        },
        "results": rows,
        "note": "client, server and raw session share this machine; raw excludes JPEG decode",
    }


if __name__ == "__main__":
    sys.exit(main())
