"""Dynamic batching across requests and back-pressure (429), observed through /metrics."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.runtime import OnnxModel, RunControl, load_model
from tests.service.conftest import png_bytes, run_server, tiny_settings, wait_for


def _post(url: str, blob: bytes, params: dict[str, str], barrier: threading.Barrier) -> int:
    with httpx.Client(base_url=url, timeout=60) as client:
        barrier.wait()
        files = [("images", ("a.png", blob, "image/png"))]
        return client.post("/embed", files=files, params=params).status_code


def test_concurrent_requests_share_inference_calls(tiny_model_repository: Path) -> None:
    settings = tiny_settings(
        tiny_model_repository, max_queue_delay_ms=1500, wait_when_idle=True, max_batch_size=16
    )
    with run_server(settings) as server:
        batches = server.metric("dino_batch_size_count")  # warm-up runs outside the batcher
        images = server.metric("dino_batch_size_sum")
        requests = [({"resolution": "32"}, seed) for seed in range(6)]
        requests += [({"resolution": "48"}, seed) for seed in range(6)]
        barrier = threading.Barrier(len(requests), timeout=60)
        with ThreadPoolExecutor(len(requests)) as pool:
            statuses = list(
                pool.map(
                    lambda job: _post(server.url, png_bytes(seed=job[1]), job[0], barrier),
                    requests,
                )
            )
        assert statuses == [200] * len(requests)
        calls = server.metric("dino_batch_size_count") - batches
        assert server.metric("dino_batch_size_sum") - images == len(requests)
        # Two processed sizes -> at least two calls; far fewer calls than requests.
        assert 2 <= calls <= 4, calls
        assert server.metric("dino_batch_size_bucket", {"le": "2.0"}) < calls + batches


def test_full_queue_answers_429_with_retry_after(tiny_model_repository: Path) -> None:
    gate = threading.Event()  # closed while the queue is full: no timing window to hit
    gate.set()  # open for the load's checks and warm-up

    def loader(*args: Any, **kwargs: Any) -> OnnxModel:
        model = load_model(*args, **kwargs)
        run = model.run

        def gated(
            pixels: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
        ) -> dict[str, np.ndarray]:
            assert gate.wait(60)
            return run(pixels, outputs, control)

        model.run = gated  # type: ignore[method-assign]
        return model

    settings = tiny_settings(
        tiny_model_repository,
        max_queue_images=4,
        max_images_per_request=4,
        max_queue_delay_ms=1500,
        wait_when_idle=True,  # the first request's images wait in the queue
        max_batch_size=64,
        retry_after_s=7,
    )
    with run_server(settings, loader=loader) as server:
        files = [("images", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(4)]

        def first() -> int:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return client.post("/embed", files=files).status_code

        gate.clear()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(first)
            try:
                # Queued for 1.5 s, then held in the gated inference call: in flight all along.
                wait_for(lambda: server.metric("dino_images_in_flight") == 4)
                refused = server.client.post("/embed", files=files[:1])
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "7"
                assert refused.json()["error"]["code"] == "overloaded"
                assert server.metric("dino_images_in_flight") == 4
            finally:
                gate.set()
            assert pending.result() == 200
        assert server.metric("dino_images_in_flight") == 0
        assert server.client.post("/embed", files=files[:1]).status_code == 200
        assert server.metric("dino_http_requests_total", {"route": "/embed", "status": "429"}) == 1


def _raw_embed(url: str, blob: bytes) -> socket.socket:
    """Send a whole one-image ``POST /embed`` on a raw socket and leave the answer unread."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(
        b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {len(blob)}\r\n\r\n".encode()
        + blob
    )
    return connection


def test_disconnected_client_is_withdrawn_from_the_queue(tiny_model_repository: Path) -> None:
    # A 60 s queue delay and batches of 3: nothing runs until a batch is full, so no timing is
    # involved. The client that leaves has its image taken out of the queue (no inference for
    # it, capacity freed at once); the batch that runs holds the kept image and a later
    # request's two.
    settings = tiny_settings(
        tiny_model_repository, max_queue_delay_ms=60_000, wait_when_idle=True, max_batch_size=3
    )
    with run_server(settings) as server:
        batches = server.metric("dino_batch_size_count")
        images = server.metric("dino_batch_size_sum")
        with ThreadPoolExecutor(2) as pool:
            barrier = threading.Barrier(1, timeout=60)
            kept = pool.submit(_post, server.url, png_bytes(seed=1), {}, barrier)
            wait_for(lambda: server.metric("dino_queue_depth") == 1)
            leaving = _raw_embed(server.url, png_bytes(seed=2))
            wait_for(lambda: server.metric("dino_queue_depth") == 2)
            leaving.close()
            wait_for(lambda: server.metric("dino_withdrawn_images_total") == 1)
            wait_for(lambda: server.metric("dino_http_requests_total", {"status": "499"}) == 1)
            assert server.metric("dino_queue_depth") == 1
            assert server.metric("dino_images_in_flight") == 1
            assert server.metric("dino_batch_size_count") == batches  # nothing ran yet
            files = [("images", (f"{i}.png", png_bytes(seed=3 + i), "image/png")) for i in (0, 1)]
            assert server.client.post("/embed", files=files).status_code == 200
            assert kept.result() == 200
        assert server.metric("dino_batch_size_count") - batches == 1
        assert server.metric("dino_batch_size_sum") - images == 3
        assert server.metric("dino_images_in_flight") == 0
        assert server.metric("dino_queue_depth") == 0
        assert server.metric("dino_http_requests_total", {"status": "500"}) == 0
