"""Resource limits against a real server: image geometry, attention memory, body reading,
inference failures and client disconnects."""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.runtime import OnnxModel, RunControl, load_model
from tests.service.conftest import (
    LiveServer,
    encode,
    gradient_rgb,
    png_bytes,
    run_server,
    tiny_settings,
    wait_for,
)


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _post(url: str, blob: bytes, barrier: threading.Barrier | None = None) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as client:
        if barrier is not None:
            barrier.wait()
        return client.post("/embed", files=[("images", ("a.png", blob, "image/png"))])


def test_a_max_resolution_below_the_models_default_is_raised_to_it(
    tiny_model_repository: Path,
) -> None:
    # The tiny model's default is 32; DINO_MAX_RESOLUTION=16 must not make a plain request,
    # resolution=32 and crop=none disagree about what the model may see.
    with run_server(tiny_settings(tiny_model_repository, max_resolution=16)) as server:
        files = [("images", ("a.png", png_bytes(64, 48), "image/png"))]
        sizes = []
        for data in [{}, {"resolution": "32"}, {"crop": "none"}]:
            response = server.client.post("/embed", files=files, data=data)
            assert response.status_code == 200, (data, response.text)
            body = response.json()
            sizes.append((body["options"]["resolution"], body["results"][0]["processed_size"]))
        square = (32, {"width": 32, "height": 32})
        assert sizes == [square, square, (32, {"width": 32, "height": 24})]  # 64x48 capped at 32
        response = server.client.post("/embed", files=files, data={"resolution": "40"})
        assert response.status_code == 422 and "between 8 and 32" in response.text


def test_extreme_aspect_ratio_stays_in_memory_bounds(live: LiveServer) -> None:
    # 1 x 3000 at resolution 256: torchvision's intermediate would be 293 x 879,000 pixels
    # (~770 MB of RGB). Kept moderate so a regression fails this assertion instead of
    # exhausting the machine (1 x 100000 would need ~26 GB).
    strip = encode(Image.fromarray(gradient_rgb(1, 3000)), "PNG")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; server is in-process
    response = live.client.post(
        "/embed", files=[("images", ("s.png", strip, "image/png"))], data={"resolution": "256"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["processed_size"] == {"width": 256, "height": 256}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, grown_mib
    long_strip = encode(Image.fromarray(gradient_rgb(1, 100_000)), "PNG")
    for data in [{"crop": "none"}, {"crop": "center", "resolution": "64"}]:
        response = live.client.post(
            "/embed", files=[("images", ("s.png", long_strip, "image/png"))], data=data
        )
        assert response.status_code == 200, response.text
        size = response.json()["results"][0]["processed_size"]
        assert max(size["width"], size["height"]) <= 1024


def test_attention_budget_splits_batches_and_refuses_huge_images(
    tiny_model_repository: Path,
) -> None:
    # Tiny model (patch 8, 2 heads): 32x32 -> 17 tokens -> 2 * 17**2 * 4 = 2312 bytes/image.
    settings = tiny_settings(
        tiny_model_repository, max_batch_attention_bytes=5000, max_queue_delay_ms=200
    )
    with run_server(settings) as server:
        calls = server.metric("dino_batch_size_count")
        small = server.metric("dino_batch_size_bucket", {"le": "2.0"})
        files = [("images", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(6)]
        response = server.client.post("/embed", files=files)
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 6
        assert server.metric("dino_batch_size_count") - calls == 3  # 6 images, 2 per call
        assert server.metric("dino_batch_size_bucket", {"le": "2.0"}) - small == 3

        # 48x48 -> 37 tokens -> 10952 bytes: refused before decoding, whatever the images.
        response = server.client.post("/embed", files=files[:1], data={"resolution": "48"})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_tokens" and error["index"] is None
        assert "DINO_MAX_BATCH_ATTENTION_BYTES" in error["message"]
        assert "crop=center" not in error["message"]  # it already is centre-cropped
        # crop=none: the size depends on the image, so the error names it.
        wide = ("images", ("w.png", png_bytes(90, 30), "image/png"))
        response = server.client.post("/embed", files=[files[0], wide], data={"crop": "none"})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["index"] == 1
        assert "or crop=center" in response.json()["error"]["message"]
        # ... but not when the centre crop at that resolution would not fit either.
        response = server.client.post(
            "/embed", files=[wide], data={"crop": "none", "resolution": "48"}
        )
        assert response.status_code == 413, response.text
        assert "crop=center" not in response.json()["error"]["message"]
        assert server.metric("dino_batch_size_count") - calls == 3  # nothing more ran
        # When the query settles both the size and the crop (a raw image body has no other
        # options; a query option cannot be repeated in the form), the answer comes before
        # the body: only the headers are sent here.
        for content_type, query in [
            ("image/png", "resolution=48"),
            ("multipart/form-data; boundary=b", "resolution=48&crop=center"),
        ]:
            connection = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
            connection.sendall(
                f"POST /embed?{query} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}"
                "\r\nContent-Length: 1000000\r\n\r\n".encode()
            )
            answer = _json_answer(connection)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert b'"too_many_tokens"' in answer


def test_failed_inference_spares_batch_mates_and_hides_engine_text(
    tiny_model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def loader(*args: Any, **kwargs: Any) -> OnnxModel:
        model = load_model(*args, **kwargs)
        run = model.run

        def poisoned(
            pixels: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
        ) -> dict[str, np.ndarray]:
            if pixels.reshape(pixels.shape[0], -1).mean(axis=1).max() > 1.5:  # a white image
                raise RuntimeError("onnxruntime internal: node /blocks.0/attn secret detail")
            return run(pixels, outputs, control)

        model.run = poisoned  # type: ignore[method-assign]
        return model

    white = encode(Image.new("RGB", (40, 30), (255, 255, 255)), "PNG")
    normal = png_bytes(seed=3)
    settings = tiny_settings(tiny_model_repository, max_queue_delay_ms=2000, wait_when_idle=True)
    with run_server(settings, loader=loader) as server:
        calls = server.metric("dino_batch_size_count")
        barrier = threading.Barrier(2, timeout=60)
        with caplog.at_level(logging.WARNING, logger="service"), ThreadPoolExecutor(2) as pool:
            bad, good = pool.map(lambda blob: _post(server.url, blob, barrier), [white, normal])
        assert good.status_code == 200, good.text
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert error["code"] == "inference_failed"
        assert "secret" not in error["message"] and "onnxruntime" not in error["message"]
        reference = error["message"].split("reference ")[1].split(")")[0]
        assert any(reference in record.getMessage() for record in caplog.records)
        # one shared call that failed, then one retry per image
        assert server.metric("dino_batch_size_count") - calls == 3


def test_non_finite_outputs_at_request_time_are_a_clean_500(
    tiny_model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A model that passed its load checks but overflows on some image: JSON cannot carry NaN
    # (it was a 500 with a traceback), base64 would have carried it silently.
    def loader(*args: Any, **kwargs: Any) -> OnnxModel:
        model = load_model(*args, **kwargs)
        run = model.run

        def overflowing(
            pixels: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
        ) -> dict[str, np.ndarray]:
            values = run(pixels, outputs, control)
            for row in range(pixels.shape[0]):
                if pixels[row].mean() > 1.5:  # a white image
                    for value in values.values():
                        value[row] = np.nan
            return values

        model.run = overflowing  # type: ignore[method-assign]
        return model

    white = encode(Image.new("RGB", (40, 30), (255, 255, 255)), "PNG")
    with run_server(tiny_settings(tiny_model_repository), loader=loader) as server:
        for encoding in ("json", "base64"):
            response = server.client.post(
                "/embed",
                files=[
                    ("images", ("a.png", png_bytes(), "image/png")),
                    ("images", ("w.png", white, "image/png")),
                ],
                data={"outputs": "cls,patch,attention", "encoding": encoding},
            )
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert error["code"] == "inference_failed" and error["index"] == 1
            assert "not finite" in error["message"]
        assert not [r for r in caplog.records if r.exc_info]  # logged without a traceback
        assert _post(server.url, png_bytes()).status_code == 200


@pytest.fixture(scope="module")
def guarded(tiny_model_repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(
        tiny_model_repository,
        max_body_bytes=40_000,
        max_body_bytes_in_flight=50_000,
        body_timeout_s=30.0,  # far beyond these tests' stalls, however slow the machine
        retry_after_s=3,
    )
    with run_server(settings) as server:
        yield server


def _stalled_upload(server: LiveServer, declared: int, sent: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    connection.sendall(
        b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    return connection


def _json_answer(connection: socket.socket) -> bytes:
    """Read a raw HTTP answer with a JSON body up to its end, then close the connection."""
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    finally:
        connection.close()
    return answer


def test_client_disconnect_is_not_a_server_error(
    guarded: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service"):
        connection = _stalled_upload(guarded, 1000, b"0123456789")
        time.sleep(0.2)
        connection.close()
        wait_for(lambda: guarded.metric("dino_http_requests_total", {"status": "499"}) == 1)
    assert guarded.metric("dino_http_requests_total", {"status": "500"}) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("client disconnected" in r.getMessage() for r in caplog.records)
    assert guarded.metric("dino_request_body_bytes_in_flight") == 0


def test_body_budget_refuses_while_bodies_are_pending(guarded: LiveServer) -> None:
    # Bytes that arrived are held; a declared size alone holds nothing (or four idle
    # connections announcing large bodies would lock every upload out).
    idle = [_stalled_upload(guarded, 40_000, b"") for _ in range(4)]
    stalled = _stalled_upload(guarded, 40_000, b"x" * 30_000)
    try:
        wait_for(lambda: guarded.metric("dino_request_body_bytes_in_flight") == 30_000)
        blob = png_bytes()
        padded = guarded.client.post(
            "/embed",
            content=blob + b"\0" * (30_000 - len(blob)),  # PNG ignores trailing bytes
            headers={"content-type": "image/png"},
        )
        assert padded.status_code == 429, padded.text
        assert padded.json()["error"]["code"] == "overloaded"
        assert padded.headers["retry-after"] == "3"
        assert _post(guarded.url, blob).status_code == 200  # small bodies still fit
    finally:
        stalled.close()
        for connection in idle:
            connection.close()
    wait_for(lambda: guarded.metric("dino_request_body_bytes_in_flight") == 0)


def test_refusals_while_the_body_arrives_close_the_connection(guarded: LiveServer) -> None:
    # Otherwise the client goes on sending the rest of its body into a connection that stays
    # open (each chunk restarting uvicorn's idle timer): 413 over max_body_bytes, declared or
    # found while reading, and 429 when the body budget runs out mid-body.
    declared = _stalled_upload(guarded, 10**11, b"")
    chunked = socket.create_connection(("127.0.0.1", _port(guarded)), timeout=10)
    chunked.sendall(  # no declared size: the limit is found while reading
        b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 50_000 + b"x" * 50_000 + b"\r\n"
    )
    for connection in (declared, chunked):
        answer = _json_answer(connection)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"connection: close" in answer.lower()
    stalled = _stalled_upload(guarded, 40_000, b"x" * 30_000)
    try:
        wait_for(lambda: guarded.metric("dino_request_body_bytes_in_flight") == 30_000)
        second = _stalled_upload(guarded, 40_000, b"z" * 25_000)
        answer = _json_answer(second)
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        assert b"connection: close" in answer.lower() and b"retry-after: 3" in answer.lower()
    finally:
        stalled.close()
    wait_for(lambda: guarded.metric("dino_request_body_bytes_in_flight") == 0)
    # Answers after a complete body keep the connection open for the next request.
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        for _ in range(2):
            response = client.post(
                "/embed", content=png_bytes(), headers={"content-type": "image/png"}
            )
            assert response.status_code == 200 and "connection" not in response.headers


def test_slow_body_times_out_with_408(tiny_model_repository: Path) -> None:
    settings = tiny_settings(tiny_model_repository, body_timeout_s=2.0)
    with run_server(settings) as server:
        connection = _stalled_upload(server, 1000, b"0123456789")
        started = time.monotonic()
        answer = _json_answer(connection)
        assert 1.5 < time.monotonic() - started < 30
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"code":"request_timeout"' in answer
        assert b"connection: close" in answer.lower()
        wait_for(lambda: server.metric("dino_request_body_bytes_in_flight") == 0)


@pytest.mark.parametrize(
    ("content_type", "query", "status", "code"),
    [
        ("text/plain", "", 415, "unsupported_media_type"),
        ("multipart/form-data", "", 400, "malformed_request"),  # no boundary
        ("image/png", "?bogus=1", 422, "invalid_option"),
        ("image/png", "?crop=diagonal", 422, "invalid_option"),
        ("image/png", "?resolution=5000", 422, "invalid_option"),  # beyond max_resolution
    ],
)
def test_what_the_headers_decide_is_refused_before_the_body_is_asked_for(
    guarded: LiveServer, content_type: str, query: str, status: int, code: str
) -> None:
    """A client that sends ``Expect: 100-continue`` never uploads a body bound for a 4xx."""
    connection = socket.create_connection(("127.0.0.1", _port(guarded)), timeout=10)
    connection.sendall(
        f"POST /embed{query} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    answer = _json_answer(connection)
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
    assert b"100 Continue" not in answer
    assert f'"code":"{code}"'.encode() in answer
    assert guarded.metric("dino_request_body_bytes_in_flight") == 0


def test_answers_over_the_response_limit_are_refused_before_the_work(
    tiny_model_repository: Path,
) -> None:
    # Tiny model at 32 px: 4x4 patches, width 32, 2 heads. patch+attention = 16*32 + 2*16 = 544
    # values an image: 13,056 bytes as JSON (24 a value), 2,904 as base64 float32.
    settings = tiny_settings(tiny_model_repository, max_response_bytes=2**16)
    with run_server(settings) as server:
        calls = server.metric("dino_batch_size_count")
        files = [("images", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(6)]
        dense = {"outputs": "patch,attention"}
        response = server.client.post("/embed", files=files, data=dense)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert (
            error["code"] == "response_too_large" and "DINO_MAX_RESPONSE_BYTES" in error["message"]
        )
        assert server.metric("dino_batch_size_count") == calls  # refused before inference
        # The same arrays fit as base64, and fewer images fit as JSON.
        encoded = server.client.post("/embed", files=files, data={**dense, "encoding": "base64"})
        assert encoded.status_code == 200, encoded.text
        assert server.client.post("/embed", files=files[:4], data=dense).status_code == 200
        # crop=none: sizes are known after decoding; still refused before encoding.
        big = ("images", ("big.png", png_bytes(96, 96), "image/png"))
        response = server.client.post(
            "/embed", files=[big], data={**dense, "crop": "none", "resolution": "96"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "response_too_large"
