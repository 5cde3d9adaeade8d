"""End-to-end tests of the attention explorer page in a real headless browser.

The service runs in a subprocess on a random loopback port with the bundled model
(``model_repository/dino_default``) when it exists, else with the tiny fixture model. Debian's
``/usr/bin/chromium`` is driven by Playwright; the tests are skipped only when it is missing.
Screenshots are kept under ``artifacts/`` (git-ignored).

Set ``DINO_E2E_BASE_URL`` to run the page tests against an already running service instead.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
BUNDLED_REPOSITORY = REPO_ROOT / "model_repository"
BUNDLED_NAME = "dino_default"
MAX_IMAGE_PIXELS = 1_000_000  # small enough to provoke a 413 with a generated image
READY_TIMEOUT_S = 180.0
RENDER_TIMEOUT_MS = 90_000
CANVASES = "#mean-canvas, #mask-canvas, #pca-canvas, canvas[data-head]"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _wait_ready(base_url: str, process: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(
        f"the service was not ready within {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}"
    )


def _model_location(request: pytest.FixtureRequest) -> tuple[Path, str]:
    if any((BUNDLED_REPOSITORY / BUNDLED_NAME).glob("*/model.onnx")):
        return BUNDLED_REPOSITORY, BUNDLED_NAME
    repository: Path = request.getfixturevalue("tiny_model_repository")
    return repository, "tiny"


@pytest.fixture(scope="module")
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a running service: started here on a random loopback port."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install chromium)")
    external = os.environ.get("DINO_E2E_BASE_URL")
    log = tmp_path_factory.mktemp("service") / "service.log"
    if external:
        _wait_ready(external.rstrip("/"), None, log)
        yield external.rstrip("/")
        return
    repository, name = _model_location(request)
    port = _free_port()
    env = {
        **os.environ,
        "DINO_HOST": "127.0.0.1",
        "DINO_PORT": str(port),
        "DINO_MODEL_REPOSITORY": str(repository),
        "DINO_MODEL_NAME": name,
        "DINO_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "DINO_POLL_INTERVAL_S": "0",
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def browser(base_url: str) -> Iterator[Any]:
    """Headless Debian chromium (never a Playwright-downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield instance
        instance.close()


class Recorder:
    """Every URL the page requested and every script error it raised."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []

    def foreign(self) -> list[str]:
        """Requested URLs whose host is not the loopback address."""
        bad = []
        for url in self.urls:
            parts = urlsplit(url[len("blob:") :] if url.startswith("blob:") else url)
            if parts.scheme == "data":
                continue
            if parts.hostname != "127.0.0.1":
                bad.append(url)
        return bad


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[tuple[Any, Recorder]]:
    """A fresh 1280x800 page on the explorer, with its requests recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    recorder = Recorder()
    tab.on("request", lambda request: recorder.urls.append(request.url))
    tab.on("pageerror", lambda error: recorder.errors.append(str(error)))
    # A listener from the start turns on file-chooser interception before any key press
    # (enabling it only inside expect_file_chooser races with the press).
    tab.on("filechooser", lambda chooser: None)
    tab.goto(f"{base_url}/")
    tab.wait_for_selector("#drop-zone")
    yield tab, recorder
    context.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skimage's cat photo (451x300) as a PNG file."""
    import skimage.data

    path = tmp_path_factory.mktemp("images") / "chelsea.png"
    pixels: np.ndarray = skimage.data.chelsea()  # type: ignore[no-untyped-call]
    Image.fromarray(pixels).save(path)
    return path


def _served_model(base_url: str) -> dict[str, Any]:
    """The ``loaded`` block of ``GET /v1/models``: name, version, num_heads, ..."""
    body = _get_json(f"{base_url}/v1/models")
    model = body.get("loaded")
    assert isinstance(model, dict), f"no model is loaded: {body}"
    return model


def _wait_rendered(tab: Any) -> None:
    tab.wait_for_selector('#results[data-state="ready"]', timeout=RENDER_TIMEOUT_MS)


def _canvas_stats(tab: Any) -> list[dict[str, Any]]:
    """Size and luminance standard deviation (0..255) of every result canvas."""
    script = """(selector) => Array.from(document.querySelectorAll(selector)).map((canvas) => {
        const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
        let sum = 0, square = 0, opaque = 0;
        const count = data.length / 4;
        for (let i = 0; i < data.length; i += 4) {
            const y = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
            sum += y; square += y * y; opaque += data[i + 3] === 255 ? 1 : 0;
        }
        const mean = sum / count;
        return { name: canvas.id || `head ${canvas.dataset.head}`, width: canvas.width,
                 height: canvas.height, std: Math.sqrt(Math.max(0, square / count - mean * mean)),
                 opaque: opaque / count, label: canvas.getAttribute("aria-label") };
    })"""
    stats: list[dict[str, Any]] = tab.evaluate(script, CANVASES)
    return stats


def test_photo_renders_heads_mean_mask_and_pca(
    page: tuple[Any, Recorder], base_url: str, photo: Path
) -> None:
    tab, recorder = page
    model = _served_model(base_url)
    tab.set_input_files("#file-input", str(photo))
    _wait_rendered(tab)

    assert tab.locator("canvas[data-head]").count() == int(model["num_heads"])
    heads = [
        int(h)
        for h in tab.eval_on_selector_all("canvas[data-head]", "c => c.map(x => x.dataset.head)")
    ]
    assert heads == list(range(int(model["num_heads"])))
    stats = _canvas_stats(tab)
    assert len(stats) == int(model["num_heads"]) + 3
    for canvas in stats:
        assert canvas["width"] > 0 and canvas["height"] > 0, canvas
        assert canvas["opaque"] > 0.99, f"{canvas['name']} is not fully drawn: {canvas}"
        assert canvas["std"] > 5.0, f"{canvas['name']} looks blank: {canvas}"
        assert canvas["label"] and "no result" not in canvas["label"], canvas
    # The overlays follow the photo's aspect ratio (451x300), the PCA the patch grid's.
    mean = next(c for c in stats if c["name"] == "mean-canvas")
    assert mean["width"] / mean["height"] == pytest.approx(451 / 300, rel=0.01)

    assert tab.inner_text("#model-name") == str(model["name"])
    assert tab.inner_text("#model-version") == str(model["version"])
    assert tab.inner_text("#model-provider") == str(model["execution_provider"])
    assert "ms" in tab.inner_text("#timing-roundtrip")
    assert tab.is_visible("#preview")
    assert tab.is_hidden("#error")
    assert "keeps 60%" in tab.inner_text("#mask-caption")

    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "explorer-1280x800.png"))
    tab.check('input[name="head-mode"][value="mask"]')
    assert "hold 60%" in tab.inner_text("#heads")
    tab.screenshot(path=str(ARTIFACTS / "explorer-masks-1280x800.png"))

    tab.set_viewport_size({"width": 390, "height": 844})
    overflow = tab.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at 390 px wide"
    tab.screenshot(path=str(ARTIFACTS / "explorer-390x844.png"), full_page=True)

    assert recorder.errors == []
    assert recorder.foreign() == [], "the page loaded resources from other hosts"
    assert any(url.endswith("/embed") for url in recorder.urls)


def test_threshold_slider_changes_the_mask(page: tuple[Any, Recorder], photo: Path) -> None:
    tab, _ = page
    tab.set_input_files("#file-input", str(photo))
    _wait_rendered(tab)

    def kept() -> int:
        caption = tab.inner_text("#mask-caption")  # "... mass: K of N patches)"
        return int(caption.split("mass: ")[1].split(" of ")[0])

    at_60 = kept()
    tab.fill("#threshold", "90")
    assert "90%" in tab.inner_text("#threshold-value")
    at_90 = kept()
    tab.fill("#threshold", "20")
    at_20 = kept()
    assert at_20 <= at_60 <= at_90
    assert at_20 < at_90


def test_text_file_shows_a_visible_error(page: tuple[Any, Recorder], tmp_path: Path) -> None:
    tab, recorder = page
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    with tab.expect_response(lambda response: response.url.endswith("/embed")) as answer:
        tab.set_input_files("#file-input", str(notes))
    assert 400 <= answer.value.status < 500
    tab.wait_for_selector('#results[data-state="error"]')
    error = tab.locator("#error")
    assert error.is_visible()
    assert error.get_attribute("role") == "alert"
    assert "not an image" in error.inner_text()
    assert tab.locator("canvas[data-head]").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "explorer-error.png"))
    assert recorder.foreign() == []


def test_too_large_image_shows_a_visible_error(page: tuple[Any, Recorder], tmp_path: Path) -> None:
    if os.environ.get("DINO_E2E_BASE_URL"):
        pytest.skip("needs the service started here with a small DINO_MAX_IMAGE_PIXELS")
    tab, _ = page
    big = tmp_path / "big.png"
    Image.new("RGB", (1100, 1000), (120, 80, 40)).save(big)  # 1.1 Mpx > MAX_IMAGE_PIXELS
    with tab.expect_response(lambda response: response.url.endswith("/embed")) as answer:
        tab.set_input_files("#file-input", str(big))
    assert answer.value.status == 413
    tab.wait_for_selector('#results[data-state="error"]')
    assert "too large" in tab.inner_text("#error")


def test_busy_server_shows_retry_after_and_retries(page: tuple[Any, Recorder], photo: Path) -> None:
    tab, _ = page
    busy = json.dumps({"error": {"code": "overloaded", "message": "queue full", "index": None}})

    def answer_busy(route: Any) -> None:
        route.fulfill(
            status=429,
            headers={"Retry-After": "3", "Content-Type": "application/json"},
            body=busy,
        )

    tab.route("**/embed", answer_busy)
    tab.set_input_files("#file-input", str(photo))
    tab.wait_for_selector('#results[data-state="error"]')
    message = tab.inner_text("#error-message")
    assert "busy" in message and "3 s" in message
    assert tab.is_visible("#retry")

    tab.unroute("**/embed")
    tab.click("#retry")
    _wait_rendered(tab)
    assert tab.is_hidden("#error")


def test_keyboard_drop_and_paste_inputs(page: tuple[Any, Recorder], photo: Path) -> None:
    tab, _ = page
    focused = []
    for _ in range(4):
        tab.keyboard.press("Tab")
        focused.append(tab.evaluate("document.activeElement.id"))
    assert "drop-zone" in focused and "file-input" in focused

    tab.focus("#drop-zone")
    with tab.expect_file_chooser(timeout=10_000):
        tab.keyboard.press(" ")
    with tab.expect_file_chooser(timeout=10_000) as chooser:
        tab.keyboard.press("Enter")
    chooser.value.set_files(str(photo))
    _wait_rendered(tab)

    encoded = base64.b64encode(photo.read_bytes()).decode()
    for event in ("drop", "paste"):
        tab.evaluate("document.getElementById('results').dataset.state = 'empty'")
        tab.evaluate(
            """([encoded, event]) => {
                const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], `cat-${event}.png`, { type: "image/png" }));
                const target = document.getElementById("drop-zone");
                const init = { bubbles: true, cancelable: true };
                const dispatched = event === "drop"
                    ? new DragEvent("drop", { ...init, dataTransfer: transfer })
                    : new ClipboardEvent("paste", { ...init, clipboardData: transfer });
                target.dispatchEvent(dispatched);
            }""",
            [encoded, event],
        )
        _wait_rendered(tab)
        assert f"cat-{event}.png" in tab.inner_text("#file-name")


def _reference_mask(attention: np.ndarray, fraction: float) -> np.ndarray:
    """visualize_attention.py's mask, per head of a [heads, patches] array."""
    order = np.argsort(attention, axis=1, kind="stable")
    values = np.take_along_axis(attention, order, axis=1)
    values = values / values.sum(axis=1, keepdims=True)
    kept_sorted = np.cumsum(values, axis=1) > 1 - fraction
    mask = np.zeros_like(kept_sorted)
    np.put_along_axis(mask, order, kept_sorted, axis=1)
    return mask


def test_mask_pca_and_decoding_match_numpy(page: tuple[Any, Recorder]) -> None:
    tab, _ = page
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 60)) * 2
    attention = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Features with well separated variances along three random directions, plus noise.
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    scores = rng.normal(size=(200, 16)) * np.array([9.0, 5.0, 3.0] + [0.5] * 13)
    features = (scores @ basis.T + rng.normal(size=16)).astype(np.float32)
    half = rng.normal(size=(2, 3, 4)).astype(np.float16)

    result = tab.evaluate(
        """async ([attention, fractions, features, n, d, half]) => {
            const analysis = await import("/static/analysis.js");
            const masks = fractions.map(
                (f) => attention.map((row) => Array.from(analysis.attentionMask(row, f))));
            const { rgba, pca } = analysis.pcaRgb(Float32Array.from(features), n, d);
            const decoded = analysis.decodeArray(half);
            const nested = analysis.decodeArray([[1, 2], [3, 4.5]]);
            return { masks, rgba: Array.from(rgba), eigenvalues: pca.eigenvalues,
                     components: pca.components.map((c) => Array.from(c)),
                     half: { shape: decoded.shape, data: Array.from(decoded.data) },
                     nested: { shape: nested.shape, data: Array.from(nested.data) } };
        }""",
        [
            attention.tolist(),
            [0.6, 0.3, 0.95],
            features.ravel().tolist(),
            200,
            16,
            {
                "dtype": "float16",
                "shape": list(half.shape),
                "data": base64.b64encode(half.astype("<f2").tobytes()).decode(),
            },
        ],
    )

    for fraction, masks in zip([0.6, 0.3, 0.95], result["masks"], strict=True):
        np.testing.assert_array_equal(
            np.array(masks, dtype=bool), _reference_mask(attention, fraction)
        )

    centred = features.astype(np.float64) - features.astype(np.float64).mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    top = vectors[:, ::-1][:, :3]
    np.testing.assert_allclose(result["eigenvalues"], eigenvalues[::-1][:3], rtol=1e-6)
    components = np.array(result["components"])
    np.testing.assert_allclose(np.abs(np.sum(components * top.T, axis=1)), 1.0, atol=1e-8)
    projections = centred @ components.T  # [n, 3] with the page's signs
    low, high = projections.min(axis=0), projections.max(axis=0)
    expected = np.round((projections - low) / (high - low) * 255)
    rgba = np.array(result["rgba"]).reshape(200, 4)
    np.testing.assert_allclose(rgba[:, :3], expected, atol=1)
    assert (rgba[:, 3] == 255).all()

    assert result["half"]["shape"] == [2, 3, 4]
    np.testing.assert_array_equal(np.array(result["half"]["data"]), half.astype(np.float32).ravel())
    assert result["nested"] == {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.5]}


def _real_answer(base_url: str, photo: Path) -> dict[str, Any]:
    """The service's own /embed answer for the photo, as the page asks for it."""
    import httpx

    response = httpx.post(
        f"{base_url}/embed",
        files={"images": (photo.name, photo.read_bytes(), "image/png")},
        data={"outputs": "cls,patch,attention", "crop": "none", "encoding": "base64"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_one_head_model_renders(page: tuple[Any, Recorder], base_url: str, photo: Path) -> None:
    """[1, rows, cols] attention (a model with embed_dim 64 has one head) is not a batch axis."""
    tab, recorder = page
    answer = _real_answer(base_url, photo)
    result = answer["results"][0]
    maps = result["attention_maps"]
    heads, rows, cols = maps["shape"]
    first = np.frombuffer(base64.b64decode(maps["data"]), dtype="<f4")[: rows * cols]
    result["attention_maps"] = {
        **maps,
        "shape": [1, rows, cols],
        "data": base64.b64encode(first.tobytes()).decode(),
    }
    answer["model"]["num_heads"] = 1
    tab.route(
        "**/embed",
        lambda route: route.fulfill(
            status=200, headers={"Content-Type": "application/json"}, body=json.dumps(answer)
        ),
    )
    tab.set_input_files("#file-input", str(photo))
    _wait_rendered(tab)
    assert heads >= 1 and tab.locator("canvas[data-head]").count() == 1
    assert tab.is_hidden("#error")
    assert recorder.errors == []


def test_an_elongated_image_over_the_token_limit_says_so(
    page: tuple[Any, Recorder], photo: Path
) -> None:
    tab, _ = page
    message = "at 1024x24 pixels the image has 1537 tokens; ask for a smaller resolution"
    body = json.dumps({"error": {"code": "too_many_tokens", "message": message, "index": 0}})
    tab.route(
        "**/embed",
        lambda route: route.fulfill(
            status=413, headers={"Content-Type": "application/json"}, body=body
        ),
    )
    tab.set_input_files("#file-input", str(photo))
    tab.wait_for_selector('#results[data-state="error"]')
    text = tab.inner_text("#error-message")
    assert "too wide or too tall" in text and message in text
    assert "smaller file" not in text


def test_an_api_key_no_header_can_carry_is_refused_before_sending(
    page: tuple[Any, Recorder], photo: Path
) -> None:
    tab, recorder = page
    tab.click("details.settings summary")
    tab.fill("#api-key", "clé€")
    tab.set_input_files("#file-input", str(photo))
    tab.wait_for_selector('#results[data-state="error"]')
    text = tab.inner_text("#error-message")
    assert "API key may only contain" in text
    assert "Could not reach" not in text and tab.is_hidden("#retry")
    assert not any(url.endswith("/embed") for url in recorder.urls)
    assert recorder.errors == []


def test_a_slow_preview_never_labels_a_newer_image(
    page: tuple[Any, Recorder], photo: Path, tmp_path: Path
) -> None:
    """The first file's preview decodes after the second's: the page shows the second."""
    tab, recorder = page
    tab.evaluate(
        """() => {
            const decode = HTMLImageElement.prototype.decode;
            let calls = 0;
            HTMLImageElement.prototype.decode = function () {
                calls += 1;
                const done = decode.call(this);
                if (calls !== 1) return done;
                return done.then(() => new Promise((resolve) => setTimeout(resolve, 1500)));
            };
        }"""
    )
    small = tmp_path / "small.png"
    Image.new("RGB", (120, 40), (10, 200, 30)).save(small)
    tab.set_input_files("#file-input", str(photo))
    tab.set_input_files("#file-input", str(small))
    _wait_rendered(tab)
    tab.wait_for_timeout(2_000)  # past the first file's delayed decode
    alt = tab.get_attribute("#preview", "alt") or ""
    assert "small.png" in alt and "120 × 40" in alt, alt
    assert tab.evaluate("document.getElementById('preview').naturalWidth") == 120
    assert tab.is_visible("#preview")
    assert "small.png" in tab.inner_text("#file-name")
    assert recorder.errors == []
