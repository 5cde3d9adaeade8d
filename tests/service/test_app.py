"""The HTTP API against a real uvicorn server and the tiny exported model."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import service.app as app_module
import service.prepare as prepare_module
from models.contract import model_path
from service.decode import decode_image
from service.decode_pool import DecodeProcesses
from service.metrics import Metrics
from service.preprocess import plan_geometry, to_pixels
from service.runtime import parse_metadata
from service.schemas import EmbedResponse, ErrorResponse, ModelsResponse
from service.structure import MAX_JPEG_SCANS
from tests.conftest import TINY_MODEL_NAME
from tests.service.conftest import (
    LiveServer,
    encode,
    gradient_rgb,
    jpeg_bytes,
    png_bytes,
    progressive_jpeg,
    repeat_last_scan,
    run_server,
    tiny_settings,
)

ALL_OUTPUTS = "cls,patch,attention"


def post_images(
    server: LiveServer, images: list[bytes], data: dict[str, Any] | None = None, **kwargs: Any
) -> httpx.Response:
    files = [
        ("images", (f"{i}.img", blob, "application/octet-stream")) for i, blob in enumerate(images)
    ]
    return server.client.post("/embed", files=files, data=data or {}, **kwargs)


def decode_array(value: Any) -> np.ndarray:
    """A response array (nested list or base64 object) as numpy."""
    if isinstance(value, dict):
        dtype = {"float32": "<f4", "float16": "<f2"}[value["dtype"]]
        raw = np.frombuffer(base64.b64decode(value["data"]), dtype=dtype)
        return raw.reshape(value["shape"]).astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def assert_error(
    response: httpx.Response, status: int, code: str, index: int | None = None
) -> None:
    assert response.status_code == status, response.text
    body = ErrorResponse.model_validate(response.json())
    assert body.error.code == code
    assert body.error.index == index
    assert body.error.message


@pytest.fixture(scope="module")
def direct_session(tiny_model_repository: Path) -> ort.InferenceSession:
    path = model_path(tiny_model_repository, TINY_MODEL_NAME, 1)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_direct(
    session: ort.InferenceSession, blob: bytes, *, resolution: int, crop: str
) -> dict[str, np.ndarray]:
    """The oracle: the same pixels through the ONNX file, one image at a time."""
    metadata = parse_metadata(session.get_modelmeta().custom_metadata_map)
    image = decode_image(blob, max_pixels=10**8)
    geometry = plan_geometry(
        image.width,
        image.height,
        recipe=metadata.recipe,
        resolution=resolution,
        crop=crop,  # type: ignore[arg-type]
        patch_size=metadata.patch_size,
        max_side=1024,
    )
    pixels = to_pixels(image, geometry, metadata.recipe)[None]
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"pixel_values": pixels})
    return {name: value[0] for name, value in zip(names, values, strict=True)}


def test_default_request_returns_cls_and_model_info(live: LiveServer) -> None:
    response = post_images(live, [png_bytes(40, 30)])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = EmbedResponse.model_validate(response.json())
    assert body.model.name == TINY_MODEL_NAME
    assert body.model.version == 1
    assert body.model.sha256 == "0" * 64
    assert (body.model.embed_dim, body.model.patch_size, body.model.num_heads) == (32, 8, 2)
    assert body.model.execution_provider == "CPUExecutionProvider"
    (result,) = body.results
    assert (result.original_size.width, result.original_size.height) == (40, 30)
    assert (result.processed_size.width, result.processed_size.height) == (32, 32)
    assert (result.grid.rows, result.grid.cols) == (4, 4)
    assert isinstance(result.cls_embedding, list) and len(result.cls_embedding) == 32
    assert result.patch_features is None and result.attention_maps is None
    assert body.options.outputs == ["cls_embedding"]


@pytest.mark.parametrize("crop", ["center", "none"])
def test_outputs_equal_running_onnx_directly(
    live: LiveServer, direct_session: ort.InferenceSession, crop: str
) -> None:
    blobs = [png_bytes(40, 30, seed=1), jpeg_bytes(33, 57, seed=2), png_bytes(64, 64, seed=3)]
    response = post_images(live, blobs, {"outputs": ALL_OUTPUTS, "crop": crop, "resolution": "40"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    for blob, result in zip(blobs, body["results"], strict=True):
        expected = run_direct(direct_session, blob, resolution=40, crop=crop)
        rows, cols = result["grid"]["rows"], result["grid"]["cols"]
        assert result["processed_size"] == {"width": cols * 8, "height": rows * 8}
        cls = decode_array(result["cls_embedding"])
        patch = decode_array(result["patch_features"])
        attention = decode_array(result["attention_maps"])
        assert patch.shape == (rows, cols, 32)
        assert attention.shape == (2, rows, cols)
        np.testing.assert_allclose(cls, expected["cls_embedding"], atol=1e-5)
        np.testing.assert_allclose(
            patch.reshape(rows * cols, 32), expected["patch_features"], atol=1e-5
        )  # (rows, cols, D) -> (N, D), row-major as the contract
        np.testing.assert_allclose(
            attention.reshape(2, rows * cols), expected["attention_maps"], atol=1e-5
        )


def test_crop_none_keeps_aspect_and_rounds_to_patches(live: LiveServer) -> None:
    response = post_images(live, [png_bytes(90, 30)], {"crop": "none", "outputs": "patch"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    # shorter side 30 -> 32, longer 96 (3:1 kept), both multiples of 8
    assert result["processed_size"] == {"width": 96, "height": 32}
    assert result["grid"] == {"rows": 4, "cols": 12}
    assert np.asarray(result["patch_features"]).shape == (4, 12, 32)


def test_resolution_is_rounded_to_a_patch_multiple(live: LiveServer) -> None:
    response = post_images(live, [png_bytes()], params={"resolution": "45"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["options"]["resolution"] == 48
    assert body["results"][0]["processed_size"] == {"width": 48, "height": 48}
    assert body["results"][0]["grid"] == {"rows": 6, "cols": 6}


def test_normalize_gives_unit_cls(live: LiveServer) -> None:
    raw = decode_array(post_images(live, [png_bytes()]).json()["results"][0]["cls_embedding"])
    response = post_images(live, [png_bytes()], {"normalize": "true"})
    unit = decode_array(response.json()["results"][0]["cls_embedding"])
    assert abs(float(np.linalg.norm(unit)) - 1.0) < 1e-5
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_base64_encoding_matches_json(live: LiveServer, dtype: str) -> None:
    blob = png_bytes(50, 40, seed=4)
    as_json = post_images(live, [blob], {"outputs": ALL_OUTPUTS}).json()["results"][0]
    response = post_images(
        live, [blob], {"outputs": ALL_OUTPUTS, "encoding": "base64", "dtype": dtype}
    )
    assert response.status_code == 200, response.text
    result = EmbedResponse.model_validate(response.json()).results[0]
    for name, shape in [
        ("cls_embedding", [32]),
        ("patch_features", [4, 4, 32]),
        ("attention_maps", [2, 4, 4]),
    ]:
        value = getattr(result, name)
        assert value.dtype == dtype and value.shape == shape
        tolerance = 1e-7 if dtype == "float32" else 2e-3
        np.testing.assert_allclose(
            decode_array(value.model_dump()),
            decode_array(as_json[name]),
            rtol=tolerance,
            atol=tolerance,
        )


def test_small_answers_are_encoded_on_the_loop_and_large_ones_in_the_pool_alike(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    where: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:  # no loop runs in a worker-pool thread
            where.append(threading.current_thread().name)
        return encode_response(*args, **kwargs)

    encode_response = app_module.encode_response
    monkeypatch.setattr(app_module, "encode_response", spy)
    blobs = [png_bytes(50, 40, seed=7), png_bytes(40, 60, seed=8)]
    answers = []
    # 2 images x (32 + 4x4x32 + 2x4x4) values = 1,152; the default limit is 4,096
    for limit in (app_module.INLINE_ENCODE_VALUES, 1151):
        monkeypatch.setattr(app_module, "INLINE_ENCODE_VALUES", limit)
        response = post_images(live, blobs, {"outputs": ALL_OUTPUTS})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[0] == answers[1]
    assert where[0] == "event loop" and where[1].startswith("decode"), where


def test_float16_json_values_are_half_precision(live: LiveServer) -> None:
    response = post_images(live, [png_bytes()], {"dtype": "float16"})
    values = np.asarray(response.json()["results"][0]["cls_embedding"], dtype=np.float64)
    np.testing.assert_array_equal(values, values.astype(np.float16).astype(np.float64))


def test_raw_image_body_equals_multipart(live: LiveServer) -> None:
    blob = jpeg_bytes(48, 36, seed=5)
    raw = live.client.post(
        "/embed", content=blob, headers={"content-type": "image/jpeg"}, params={"outputs": "cls"}
    )
    assert raw.status_code == 200, raw.text
    multipart = post_images(live, [blob])
    assert raw.json()["results"] == multipart.json()["results"]


def test_options_from_query_and_form_combine(live: LiveServer) -> None:
    response = post_images(
        live,
        [png_bytes()],
        {"outputs": "patch"},
        params={"outputs": "attention", "dtype": "float16"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["options"]["outputs"] == ["patch_features", "attention_maps"]
    assert body["options"]["dtype"] == "float16"
    assert "cls_embedding" not in body["results"][0]


def test_repeated_outputs_field(live: LiveServer) -> None:
    files = [("images", ("a.png", png_bytes(), "image/png"))]
    response = live.client.post("/embed", files=files, data={"outputs": ["cls", "attention"]})
    assert response.status_code == 200, response.text
    assert response.json()["options"]["outputs"] == ["cls_embedding", "attention_maps"]


@pytest.mark.parametrize(
    ("data", "params"),
    [
        ({"colour": "red"}, {}),
        ({}, {"batch": "2"}),
        ({"outputs": "cls,logits"}, {}),
        ({"normalize": "maybe"}, {}),
        ({"resolution": "big"}, {}),
        ({"resolution": "4096"}, {}),
        ({"resolution": "0"}, {}),
        ({"resolution": "9" * 400}, {}),
        ({}, {"resolution": "9" * 400}),
        ({"resolution": "3_2"}, {}),
        ({"resolution": "\u0663\u0662"}, {}),  # Arabic-Indic digits
        ({"crop": "left"}, {}),
        ({"encoding": "msgpack"}, {}),
        ({"dtype": "bfloat16"}, {}),
        ({"crop": "none"}, {"crop": "center"}),
    ],
)
def test_invalid_options_answer_422(
    live: LiveServer, data: dict[str, str], params: dict[str, str]
) -> None:
    response = post_images(live, [png_bytes()], data, params=params)
    assert_error(response, 422, "invalid_option")


def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(live: LiveServer) -> None:
    # Starlette would answer 307 with an empty body and a Location built from the Host header.
    for method, path in [("POST", "/embed/"), ("GET", "/readyz/"), ("GET", "/static")]:
        response = live.client.request(method, path, headers={"Host": "elsewhere.example"})
        assert_error(response, 404, "not_found")
        assert "location" not in response.headers


def test_image_errors_name_the_bad_image(live: LiveServer) -> None:
    good = png_bytes()
    truncated = jpeg_bytes(64, 64)[:300]
    corrupt = bytearray(png_bytes(64, 64))
    corrupt[60:200] = bytes(140)
    cases = [
        (b"", 400, "empty_image"),
        (b"this is plain text, not an image", 400, "not_an_image"),
        (truncated, 400, "corrupt_image"),
        (bytes(corrupt), 400, "corrupt_image"),
        (encode(Image.fromarray(gradient_rgb(8, 8)), "PPM"), 415, "unsupported_image_format"),
        (repeat_last_scan(progressive_jpeg(), MAX_JPEG_SCANS), 422, "image_too_complex"),
    ]
    for blob, status, code in cases:
        response = post_images(live, [good, blob, good])
        assert_error(response, status, code, index=1)


def test_a_bad_image_changes_nothing_else(live: LiveServer) -> None:
    batches = live.metric("dino_batch_size_count")
    images = live.metric("dino_images_total")
    response = post_images(live, [png_bytes(), b"garbage"])
    assert_error(response, 400, "not_an_image", index=1)
    assert live.metric("dino_batch_size_count") == batches  # nothing reached inference
    assert live.metric("dino_images_total") == images
    assert live.metric("dino_rejected_images_total", {"code": "not_an_image"}) >= 1
    assert post_images(live, [png_bytes()]).status_code == 200


def test_a_compressed_body_is_refused_with_415_and_identity_is_accepted(live: LiveServer) -> None:
    png = png_bytes()
    for coding, body in (("gzip", gzip.compress(png)), ("br", png), ("identity, gzip", png)):
        response = live.client.post(
            "/embed",
            content=body,
            headers={"content-type": "image/png", "content-encoding": coding},
        )
        assert_error(response, 415, "unsupported_media_type")
        assert "Content-Encoding" in response.json()["error"]["message"]
        assert response.headers["accept-encoding"] == "identity"  # what it takes (RFC 9110)
    files = [("images", ("a.png", png, "image/png"))]
    response = live.client.post("/embed", files=files, headers={"content-encoding": "deflate"})
    assert_error(response, 415, "unsupported_media_type")
    response = live.client.post(
        "/embed", content=png, headers={"content-type": "image/png", "content-encoding": "Identity"}
    )
    assert response.status_code == 200, response.text


def test_request_errors(live: LiveServer) -> None:
    assert_error(
        live.client.post("/embed", content=b"{}", headers={"content-type": "application/json"}),
        415,
        "unsupported_media_type",
    )
    assert_error(live.client.post("/embed"), 415, "unsupported_media_type")
    assert_error(live.client.post("/embed", data={"outputs": "cls"}), 415, "unsupported_media_type")
    assert_error(
        live.client.post("/embed", files=[("other", ("a.png", png_bytes(), "image/png"))]),
        422,
        "invalid_option",
    )
    assert_error(
        live.client.post("/embed", files={"note": (None, "x")}, data={"outputs": "cls"}),
        422,
        "no_images",
    )
    assert_error(
        live.client.post(
            "/embed",
            content=b"--xyz\r\nbroken",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        "malformed_request",
    )
    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    part = b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n\r\n'
    for unterminated in [part + png_bytes(), part + png_bytes() + b"\r\n", b""]:
        response = live.client.post("/embed", content=unterminated, headers=multipart)
        assert_error(response, 400, "malformed_request")
        assert "closing boundary" in response.json()["error"]["message"]
    assert_error(
        live.client.post("/embed", content=b"--xyz--\r\n", headers=multipart), 422, "no_images"
    )
    assert_error(live.client.get("/nope"), 404, "not_found")
    assert_error(live.client.get("/embed"), 405, "method_not_allowed")
    assert live.client.get("/embed").headers["allow"] == "POST"
    for path in ("/healthz", "/readyz"):  # GET and HEAD are separate routes: both named
        response = live.client.post(path)
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "GET, HEAD"


def test_formats_are_accepted(live: LiveServer) -> None:
    rgb = Image.fromarray(gradient_rgb(40, 30))
    blobs = [
        encode(rgb, "PNG"),
        encode(rgb, "JPEG"),
        encode(rgb, "WEBP"),
        encode(rgb, "BMP"),
        encode(rgb, "GIF"),
        encode(rgb, "TIFF"),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(rgb.convert("P"), "PNG"),
        encode(rgb, "MPO", save_all=True, append_images=[rgb.rotate(90)]),
    ]
    response = post_images(live, blobs)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == len(blobs)


def test_health_readiness_models_metrics_docs(live: LiveServer) -> None:
    assert live.client.get("/healthz").json() == {"status": "alive"}
    for route in ["/healthz", "/readyz"]:
        head = live.client.head(route)
        assert head.status_code == 200 and head.content == b""
    ready = live.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["reason"] is None  # documented: always present, null when ready
    assert ready.json()["execution_provider"] == "CPUExecutionProvider"
    models = ModelsResponse.model_validate(live.client.get("/v1/models").json())
    assert models.ready and models.loaded is not None
    assert models.loaded.version == 1 and models.loaded.default_resolution == 32
    assert models.loaded.preprocessing.resize_size == 37
    assert models.loaded.self_check is not None
    assert models.loaded.self_check.max_abs_error <= models.loaded.self_check.tolerance_abs
    assert [v.state for v in models.versions] == ["serving"]
    assert models.reason is None  # documented: null when ready
    post_images(live, [png_bytes()])
    text = live.client.get("/metrics").text
    for name in [
        "dino_http_requests_total",
        "dino_http_request_duration_seconds",
        "dino_queue_depth",
        "dino_queue_wait_seconds",
        "dino_batch_size",
        "dino_images_in_flight",
        'dino_stage_duration_seconds_count{stage="decode"}',
        'dino_stage_duration_seconds_count{stage="preprocess"}',
        'dino_stage_duration_seconds_count{stage="inference"}',
        'dino_stage_duration_seconds_count{stage="session"}',
        'dino_stage_duration_seconds_count{stage="encode"}',
        'dino_model_info{execution_provider="CPUExecutionProvider",name="tiny",version="1"',
    ]:
        assert name in text, name
    assert live.metric("dino_http_requests_total", {"route": "/embed", "status": "200"}) >= 1
    # the onnxruntime call is part of the inference stage: never longer, batch by batch
    inference, session = (
        live.metric("dino_stage_duration_seconds_sum", {"stage": stage})
        for stage in ("inference", "session")
    )
    assert 0 < session <= inference
    assert live.metric("dino_stage_duration_seconds_count", {"stage": "session"}) == live.metric(
        "dino_stage_duration_seconds_count", {"stage": "inference"}
    )
    # Latency is the request's duration (seconds), not a clock reading.
    count = live.metric("dino_http_request_duration_seconds_count", {"route": "/embed"})
    total = live.metric("dino_http_request_duration_seconds_sum", {"route": "/embed"})
    assert count >= 1 and 0 < total < 10 * count
    spec = live.client.get("/openapi.json").json()
    body = spec["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert live.client.get("/docs").status_code == 200


def test_web_page_is_served_or_404(live: LiveServer) -> None:
    response = live.client.get("/")
    static = Path(__file__).resolve().parents[2] / "service" / "static" / "index.html"
    if static.is_file():
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
    else:
        assert_error(response, 404, "not_found")
    assert_error(live.client.get("/static/does-not-exist.js"), 404, "not_found")
    for odd in [
        "%00",
        "a%00b",
        "a" * 300,
        "..%2fapp.py",
        "%2e%2e/app.py",
        "%ff",
        "",
        "/etc/passwd",
    ]:
        assert_error(live.client.get(f"/static/{odd}"), 404, "not_found")


def test_web_page_and_its_files_carry_a_strict_content_security_policy(live: LiveServer) -> None:
    static = Path(__file__).resolve().parents[2] / "service" / "static"
    if not (static / "index.html").is_file():
        pytest.skip("the web page is not installed")
    for route in ["/", "/static/app.js", "/static/analysis.js", "/static/style.css"]:
        response = live.client.get(route)
        assert response.status_code == 200, route
        policy = dict(
            directive.strip().split(" ", 1)
            for directive in response.headers["content-security-policy"].split(";")
        )
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-cache"
    # The policy allows no inline code, so the page must have none.
    page = (static / "index.html").read_text()
    assert "<style" not in page and not re.search(r"<[^>]*\sstyle\s*=", page)
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", page, re.IGNORECASE)  # no onclick=...
    assert all(re.match(r"[^>]*\ssrc=", tag) for tag in page.split("<script")[1:])


def test_web_page_absent_answers_404(
    tiny_model_repository: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("service.app.STATIC_DIR", tmp_path / "missing")
    with run_server(tiny_settings(tiny_model_repository)) as server:
        assert_error(server.client.get("/"), 404, "not_found")
        assert_error(server.client.get("/static/app.js"), 404, "not_found")


@pytest.fixture(scope="module")
def strict(tiny_model_repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(
        tiny_model_repository,
        max_body_bytes=40_000,
        max_images_per_request=3,
        max_image_pixels=100 * 100,
        api_keys="alpha, beta",
    )
    with run_server(settings) as server:
        yield server


def test_limits(strict: LiveServer) -> None:
    auth = {"Authorization": "Bearer beta"}
    ok = post_images(strict, [png_bytes()], headers=auth)
    assert ok.status_code == 200, ok.text
    assert_error(post_images(strict, [png_bytes()] * 4, headers=auth), 422, "too_many_images")
    noise = np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    big_body = encode(Image.fromarray(noise), "PNG")
    assert len(big_body) > 40_000
    assert_error(post_images(strict, [big_body], headers=auth), 413, "body_too_large")
    too_many_pixels = encode(Image.fromarray(gradient_rgb(101, 100)), "PNG")
    response = post_images(strict, [png_bytes(), too_many_pixels], headers=auth)
    assert_error(response, 413, "image_too_large", index=1)


def test_too_many_multipart_parts(strict: LiveServer) -> None:
    auth = {"Authorization": "Bearer alpha"}
    files = [("images", ("a.png", png_bytes(), "image/png"))]
    # 3 images + 6 options + 4 spare: 13 parts; 14 option parts are refused while parsing
    response = strict.client.post(
        "/embed", files=files, data={"outputs": ["cls"] * 14}, headers=auth
    )
    assert_error(response, 422, "too_many_parts")
    response = strict.client.post(
        "/embed", files=files, data={"outputs": ["cls"] * 12}, headers=auth
    )
    assert response.status_code == 200, response.text


def test_server_timing_header(live: LiveServer) -> None:
    response = post_images(live, [png_bytes(), jpeg_bytes()])
    assert response.status_code == 200, response.text
    entries = {}
    for entry in response.headers["server-timing"].split(","):
        name, _, duration = entry.strip().partition(";dur=")
        entries[name] = float(duration)
    assert list(entries) == ["read", "decode", "queue", "infer", "session", "encode", "total"]
    assert all(value >= 0 for value in entries.values())
    # session is the onnxruntime call inside infer (which also stacks the batch)
    assert 0 < entries["session"] <= entries["infer"]
    stages = sum(value for name, value in entries.items() if name not in ("session", "total"))
    assert entries["infer"] > 0 and stages <= entries["total"] * 1.01 + 0.05


def test_api_keys(strict: LiveServer) -> None:
    client = strict.client
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    for route in ["/v1/models", "/metrics"]:
        assert_error(client.get(route), 401, "unauthorized")
        assert_error(
            client.get(route, headers={"Authorization": "Bearer gamma"}), 401, "unauthorized"
        )
        assert client.get(route, headers={"Authorization": "Bearer alpha"}).status_code == 200
    response = post_images(strict, [png_bytes()])
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/admin/reload"), 401, "unauthorized")
    assert (
        client.post("/admin/reload", headers={"Authorization": "Bearer alpha"}).status_code == 200
    )
    assert_error(
        post_images(strict, [png_bytes()], headers={"Authorization": "Basic YWxwaGE="}),
        401,
        "unauthorized",
    )
    for raw in [b"Bearer s\xe9cret", b"Bearer \xff\xfe", b"Bearer alph\xe1"]:  # latin-1 bytes
        assert_error(client.get("/v1/models", headers={"Authorization": raw}), 401, "unauthorized")


def test_every_metric_is_in_the_metrics_table() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    table = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = {
        line.split("|")[1].strip().strip("`")
        for line in table.splitlines()
        if line.startswith("| `")
    }
    exposed = set()
    for family in Metrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        exposed.add(family.name + suffix)
    assert exposed == documented, (sorted(exposed - documented), sorted(documented - exposed))


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays_usable(
    tiny_model_repository: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**_kwargs: Any) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "encode_response", broken)
    with run_server(tiny_settings(tiny_model_repository)) as server:
        with caplog.at_level(logging.ERROR):
            response = post_images(server, [png_bytes()])
        assert response.status_code == 500
        assert response.json() == {
            "error": {"code": "internal_error", "message": "internal server error", "index": None}
        }
        assert "a bug" not in response.text
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(logged) == 1 and "unhandled error on POST /embed" in logged[0].getMessage()
        # The same keep-alive connection answers the next request.
        assert server.client.get("/healthz").status_code == 200
        assert server.metric("dino_http_requests_total", {"route": "/embed", "status": "500"}) == 1


def _jpeg_photo(width: int, height: int) -> bytes:
    small = (max(1, width // 8), max(1, height // 8))  # drawn small, then enlarged
    y, x = np.mgrid[0 : small[1], 0 : small[0]]
    rgb = np.stack([np.sin(x / 7 + c) * 90 + np.cos(y / 4) * 30 + 128 for c in range(3)], -1)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "data"),
    [
        ((1600, 1200), {}),  # decoded at 1/8: 200x150 covers the 49x37 resize
        ((1600, 1200), {"crop": "none", "resolution": "64"}),
        # crop=center straight from a source box (the intermediate would exceed 8 MP)
        ((32000, 1024), {"resolution": "448"}),  # 16000x512 needed: decoded at 1/2
    ],
)
def test_jpeg_draft_answers_close_to_a_full_decode(
    live: LiveServer, tiny_model_repository: Path, size: tuple[int, int], data: dict[str, str]
) -> None:
    blob = _jpeg_photo(*size)
    settings = tiny_settings(tiny_model_repository, jpeg_draft=True)
    with run_server(settings) as drafting:
        reduced = post_images(drafting, [blob], {"outputs": ALL_OUTPUTS, **data})
    full = post_images(live, [blob], {"outputs": ALL_OUTPUTS, **data})
    assert reduced.status_code == full.status_code == 200, reduced.text + full.text
    a, b = reduced.json()["results"][0], full.json()["results"][0]
    assert a["original_size"] == b["original_size"] == {"width": size[0], "height": size[1]}
    assert a["processed_size"] == b["processed_size"] and a["grid"] == b["grid"]
    cls_a, cls_b = np.asarray(a["cls_embedding"]), np.asarray(b["cls_embedding"])
    cosine = cls_a @ cls_b / (np.linalg.norm(cls_a) * np.linalg.norm(cls_b))
    assert cosine > 0.99, cosine
    assert not np.array_equal(cls_a, cls_b)  # it did decode differently


def test_the_needed_size_is_the_whole_image_at_the_resize_scale(
    direct_session: ort.InferenceSession,
) -> None:
    metadata = parse_metadata(direct_session.get_modelmeta().custom_metadata_map)
    for width, height, resolution in [(1600, 1200, 32), (24000, 600, 448), (40000, 1000, 448)]:

        def plan(w: int, h: int, resolution: int = resolution) -> Any:
            return plan_geometry(
                w, h, recipe=metadata.recipe, resolution=resolution, crop="center",
                patch_size=metadata.patch_size, max_side=1024,
            )  # fmt: skip

        geometry = plan(width, height)
        needed = prepare_module._needed_size(plan, width, height)
        # with or without a source box, the same whole-image size as the exact resize
        assert needed == pytest.approx(geometry.resized, abs=1.0), (width, height)


def test_decoding_in_worker_processes_answers_as_decoding_in_threads(
    tiny_model_repository: Path, live: LiveServer
) -> None:
    blobs = [jpeg_bytes(400, 300, seed=1), png_bytes(33, 91, seed=2)]
    settings = tiny_settings(tiny_model_repository, decode_processes=2)
    with run_server(settings) as processes:
        decoder = processes.app.state.service.decoder
        assert decoder is not None and decoder.count == 2
        assert decoder.timeout_s == settings.decode_time_limit() == 30  # DINO_DECODE_TIMEOUT_S
        pids = decoder.pids()
        for data in (
            {"outputs": ALL_OUTPUTS},
            {"outputs": ALL_OUTPUTS, "crop": "none", "encoding": "base64", "resolution": "48"},
        ):
            there, here = post_images(processes, blobs, data), post_images(live, blobs, data)
            assert there.status_code == here.status_code == 200, there.text
            for a, b in zip(there.json()["results"], here.json()["results"], strict=True):
                assert a.keys() == b.keys()
                for key in a:
                    if key in ("cls_embedding", "patch_features", "attention_maps"):
                        np.testing.assert_allclose(
                            decode_array(a[key]), decode_array(b[key]), rtol=1e-5, atol=1e-6
                        )
                    else:
                        assert a[key] == b[key], key
        assert_error(post_images(processes, [blobs[0], b"garbage"]), 400, "not_an_image", 1)
        # every decoded image counts, the good one of the failed request too
        assert processes.metric("dino_stage_duration_seconds_count", {"stage": "decode"}) == 5
        assert processes.metric("dino_decode_process_restarts_total") == 0
    for pid in pids:  # the lifespan's end stopped them
        with pytest.raises(ProcessLookupError):
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.05)


# A decode worker that never answers for a file ending with this marker (bytes after a JPEG's
# end are ignored by its decoder); other files run the real code.
HANG_MARKER = b"hang-this-worker"
HANGING_WORKER = (
    "import sys, time\n"
    "import service.decode_worker as worker\n"
    "real = worker.resize_image\n"
    "def resize_image(data, index, spec):\n"
    f"    if data.endswith({HANG_MARKER!r}):\n"
    "        time.sleep(3600)\n"
    "    return real(data, index, spec)\n"
    "worker.resize_image = resize_image\n"
    "sys.exit(worker.main())\n"
)


@pytest.mark.timeout(120)
def test_an_image_over_the_decode_time_limit_is_a_422_and_the_service_goes_on(
    tiny_model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hanging = (sys.executable, "-c", HANGING_WORKER)
    monkeypatch.setattr(
        app_module, "DecodeProcesses", functools.partial(DecodeProcesses, command=hanging)
    )
    settings = tiny_settings(tiny_model_repository, decode_processes=1, decode_timeout_s=1.0)
    good = jpeg_bytes(40, 30, seed=1)
    with run_server(settings) as server:
        started = time.monotonic()
        answer = post_images(server, [good, good + HANG_MARKER])
        assert_error(answer, 422, "image_too_complex", 1)
        assert "longer than 1 s" in answer.json()["error"]["message"]
        assert time.monotonic() - started < 30
        assert server.metric("dino_decode_process_restarts_total") == 1
        assert server.metric("dino_rejected_images_total", {"code": "image_too_complex"}) == 1
        again = post_images(server, [good, good])  # the replacement serves the next request
        assert again.status_code == 200, again.text
