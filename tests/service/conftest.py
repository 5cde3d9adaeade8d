"""Service test helpers: a real uvicorn server on a loopback port, image makers, repositories."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.conftest import TINY_MODEL_NAME


@dataclass
class LiveServer:
    """A running server and a client bound to it."""

    url: str
    app: FastAPI
    client: httpx.Client

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Value of one sample from /metrics (0 when absent)."""
        text = self.client.get("/metrics").text
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            sample, _, label_text = head.partition("{")
            if sample != name:
                continue
            if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                continue
            return float(value)
        return 0.0


def tiny_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for the tiny model on CPU, with small worker pools."""
    values: dict[str, Any] = {
        "model_repository": repository,
        "model_name": TINY_MODEL_NAME,
        "device": "cpu",
        "poll_interval_s": 0,
        "decode_workers": 2,
        "intra_op_threads": 1,
        "max_queue_delay_ms": 5,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def run_server(
    settings: Settings, *, wait_for_first_scan: bool = True, **app_kwargs: Any
) -> Iterator[LiveServer]:
    """Serve ``create_app(settings)`` with uvicorn on 127.0.0.1:<free port> in a thread.

    The model loads in the background once the server listens; by default this waits until
    that first scan has finished, as a client waiting for ``/readyz`` would.
    """
    app = create_app(settings, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    while wait_for_first_scan and not app.state.service.manager.initial_scan_done:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the first model scan did not finish")
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield LiveServer(url=url, app=app, client=client)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def copy_repository(source: Path, destination: Path) -> Path:
    """A writable copy of a model repository."""
    shutil.copytree(source, destination)
    return destination


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until it is true or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def gradient_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, seeded uint8 RGB image (compresses well, survives JPEG)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, size=3)
    channels = [127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 + 2 * c) + phase[c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)  # (H, W, 3)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """Encode a PIL image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    """A PNG of :func:`gradient_rgb`."""
    return encode(Image.fromarray(gradient_rgb(width, height, seed)), "PNG")


def jpeg_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    """A JPEG of :func:`gradient_rgb`."""
    return encode(Image.fromarray(gradient_rgb(width, height, seed)), "JPEG", quality=90)


def progressive_jpeg() -> bytes:
    """A small progressive JPEG (libjpeg's default progression: 10 scans)."""
    return encode(Image.fromarray(gradient_rgb(48, 40)), "JPEG", quality=90, progressive=True)


def repeat_last_scan(jpeg: bytes, copies: int) -> bytes:
    """The file with its last scan written ``copies`` more times (the scan-bomb pattern).

    Byte stuffing keeps 0xFFDA out of entropy-coded data, so the last SOS is found by search.
    """
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * copies + b"\xff\xd9"


@pytest.fixture(scope="module")
def live(tiny_model_repository: Path) -> Iterator[LiveServer]:
    """A server on the shared (read-only) tiny repository."""
    with run_server(tiny_settings(tiny_model_repository)) as server:
        yield server
