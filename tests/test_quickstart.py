"""The README's first command, followed from a clean copy of the repository.

Copies the tracked (and not ignored) files into an empty folder, runs ``make serve`` there
(which builds its own serve-only virtualenv: no torch), waits for ``/readyz`` and answers one
``/embed`` with the bundled model.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README_SERVE_COMMAND = "make serve"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _copy_worktree(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())


def _multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "quickstartboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_readme_quick_start_command_is_the_one_tested() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"\n{README_SERVE_COMMAND}" in readme
    assert "\nmake test" in readme


@pytest.mark.slow
@pytest.mark.timeout(960)  # past the readiness loop's 900 s, which reports the server's log
def test_make_serve_from_a_clean_copy_answers_embed(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is required by the README's quick start")
    _copy_worktree(tmp_path)
    assert (tmp_path / "model_repository" / "dino_default").is_dir(), "bundled model missing"
    # What a machine without python3.11-venv leaves behind: a virtualenv without pip. The
    # command must rebuild it rather than fail on it forever.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv-serve")], check=True
    )
    port = _free_port()
    # pip rides out a slow or flaky index rather than failing the install at once.
    env = {"PIP_RETRIES": "10", "PIP_TIMEOUT": "60", **os.environ}
    env.update(DINO_PORT=str(port), DINO_HOST="127.0.0.1")
    env.pop("VIRTUAL_ENV", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        README_SERVE_COMMAND.split(),
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # a cold pip install of the serve extra
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
                    ready = json.loads(response.read())
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        assert ready is not None, (tmp_path / "serve.log").read_text()[-4000:]
        site_packages = tmp_path / ".venv-serve" / "lib" / "python3.11" / "site-packages"
        assert site_packages.is_dir() and not (site_packages / "torch").exists()
        # Every package `make serve` installed is at its version in constraints.txt.
        pins = dict(
            line.split("==")
            for line in (tmp_path / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")
        )
        installed = {
            re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in (
                folder.name.removesuffix(".dist-info").rsplit("-", 1)
                for folder in site_packages.glob("*.dist-info")
            )
        }
        installed.pop("dino-features")
        for seeded in ("pip", "setuptools"):  # what `python3.11 -m venv` puts in every venv
            installed.pop(seeded, None)
        assert "starlette" in installed and "onnxruntime-gpu" in installed
        assert {n: v for n, v in installed.items() if pins.get(n) != v} == {}

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 90)).save(buffer, format="PNG")
        body, content_type = _multipart(buffer.getvalue())
        request = urllib.request.Request(
            f"{base}/embed", data=body, headers={"Content-Type": content_type}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["model"]["name"] == "dino_default"
        embedding = answer["results"][0]["cls_embedding"]
        assert len(embedding) == answer["model"]["embed_dim"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
