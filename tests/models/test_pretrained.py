"""models.pretrained against a local mirror of the DINO release (loopback HTTP only)."""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import http.server
import io
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from models import download, export, files
from models.download import ORIGIN_SUFFIX
from models.pretrained import (
    BASE_URL_ENV,
    CACHE_DIR_ENV,
    OFFICIAL_BASE_URL,
    PRETRAINED,
    PretrainedError,
    default_cache_dir,
    fetch_pretrained,
    get_spec,
    read_state_dict,
    verify_structure,
)
from models.vit import VisionTransformer, vit_config

VITS16_PATH = "/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
VITS16_FILE = "dino_deitsmall16_pretrain.pth"
HTML_PAGE = b"<!doctype html><html><body><h1>Please sign in to the guest network</h1></body></html>"


@dataclass
class Mirror:
    """What the local server serves: path -> (mode, body); and what it was asked for."""

    base_url: str
    routes: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    accept_encodings: list[str | None] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    between_pieces: Callable[[], None] | None = None  # called while a "trickle" body is sent


def _handler(mirror: Mirror) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            mirror.requests.append(self.path)
            mirror.accept_encodings.append(self.headers.get("Accept-Encoding"))
            mode, body = mirror.routes.get(self.path, ("missing", b""))
            if mode == "missing":
                self.send_error(404, "Not Found")
                return
            if mode == "hang":  # accept, then never answer within the client's timeout
                mirror.release.wait(5.0)
                self.close_connection = True
                return
            if mode == "loop":  # a redirect to itself: urllib gives up with a multi-line reason
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == "gzip":  # a server compressing on the fly, whatever was asked for
                body = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if mode == "html" else "application/x")
            if mode == "gzip":
                self.send_header("Content-Encoding", "gzip")
            if mode == "badlength":
                self.send_header("Content-Length", "lots")
            elif mode != "nolength":  # without it, the body ends when the connection closes
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode in ("truncate", "nolength", "badlength"):  # send half, hang up
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            if mode == "trickle":  # four pieces, a pause before each of the last three
                step = -(-len(body) // 4)
                for start in range(0, len(body), step):
                    if start:
                        if mirror.between_pieces is not None:
                            mirror.between_pieces()
                        time.sleep(0.3)
                    self.wfile.write(body[start : start + step])
                    self.wfile.flush()
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    """A release mirror on 127.0.0.1 at a free port, in a thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.daemon_threads = True
    state = Mirror(base_url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(state)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def vits16_state() -> dict[str, torch.Tensor]:
    """A real ViT-S/16 backbone state dict (random weights), as the release file holds it."""
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("vit_small", 16))
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def vits16_bytes(vits16_state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(vits16_state, buffer)
    return buffer.getvalue()


@functools.cache
def _release_bytes(arch: str, patch_size: int, fill: float = 0.0) -> bytes:
    """A file with the release's keys and shapes, every tensor a view of one number (a few KiB
    whatever the architecture)."""
    with torch.device("meta"):
        shapes = {
            k: v.shape
            for k, v in VisionTransformer(vit_config(arch, patch_size)).state_dict().items()
        }
    value = torch.tensor(fill)
    buffer = io.BytesIO()
    torch.save({key: value.expand(shape) for key, shape in shapes.items()}, buffer)
    return buffer.getvalue()


def _training_checkpoint() -> bytes:
    """A full training checkpoint's layout (tensors only): the backbone nested under a network."""
    buffer = io.BytesIO()
    torch.save(
        {"teacher": {"backbone.cls_token": torch.zeros(1, 1, 384)}, "epoch": torch.tensor(3)},
        buffer,
    )
    return buffer.getvalue()


def _cache_entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def _cached(cache_dir: Path, filename: str = VITS16_FILE) -> list[str]:
    """What a successful download leaves: the checkpoint and the record of its origin."""
    return [filename, filename + ORIGIN_SUFFIX]


def test_registry_names_the_official_release() -> None:
    root = "https://dl.fbaipublicfiles.com/dino"
    assert root == OFFICIAL_BASE_URL
    expected = {
        "dino_vits16": ("vit_small", 16, f"{root}/dino_deitsmall16_pretrain/"),
        "dino_vits8": ("vit_small", 8, f"{root}/dino_deitsmall8_pretrain/"),
        "dino_vitb16": ("vit_base", 16, f"{root}/dino_vitbase16_pretrain/"),
        "dino_vitb8": ("vit_base", 8, f"{root}/dino_vitbase8_pretrain/"),
    }
    assert set(PRETRAINED) == set(expected)
    for name, (arch, patch, folder) in expected.items():
        spec = PRETRAINED[name]
        assert (spec.name, spec.arch, spec.patch_size) == (name, arch, patch)
        stem = folder.rstrip("/").rsplit("/", 1)[1]
        assert spec.url == f"{folder}{stem}.pth"
        assert spec.filename == f"{stem}.pth"
        assert spec.url_for("http://mirror:1/x/") == f"http://mirror:1/x/{stem}/{stem}.pth"
        assert spec.url_for(None) == spec.url


def test_unknown_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match="dino_vits16, dino_vits8, dino_vitb16, dino_vitb8"):
        fetch_pretrained("dino_vitl16", cache_dir=tmp_path)
    assert not tmp_path.joinpath("dino_vitl16").exists()


def test_download_then_structure_check(
    mirror: Mirror,
    vits16_bytes: bytes,
    vits16_state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mirror.routes[VITS16_PATH] = ("ok", vits16_bytes)
    cache = tmp_path / "cache"
    path = fetch_pretrained("dino_vits16", cache_dir=cache, base_url=mirror.base_url)

    assert path == cache / "dino_deitsmall16_pretrain.pth"
    assert path.read_bytes() == vits16_bytes
    assert _cache_entries(cache) == _cached(cache)  # no temporary file left
    assert mirror.requests == [VITS16_PATH]
    loaded = read_state_dict(path)
    assert loaded.keys() == vits16_state.keys()
    assert torch.equal(loaded["pos_embed"], vits16_state["pos_embed"])
    assert loaded["pos_embed"].shape == (1, 197, 384)  # 14 x 14 patches + CLS, width 384
    err = capsys.readouterr().err
    assert "Downloading dino_vits16" in err
    assert f"{len(vits16_bytes) / (1 << 20):.1f} MiB (100%)" in err


def test_cached_file_is_reused_without_a_request(
    mirror: Mirror, vits16_bytes: bytes, tmp_path: Path
) -> None:
    mirror.routes[VITS16_PATH] = ("ok", vits16_bytes)
    first = fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)
    second = fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)
    assert first == second
    assert mirror.requests == [VITS16_PATH]  # one download only


def test_a_file_placed_by_hand_is_used_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = get_spec("dino_vitb8")
    placed = tmp_path / spec.filename
    placed.write_bytes(_release_bytes("vit_base", 8))
    # An unroutable mirror proves no connection is attempted.
    path = fetch_pretrained("dino_vitb8", cache_dir=tmp_path, base_url="http://127.0.0.1:9")
    assert path == placed
    assert path.read_bytes() == _release_bytes("vit_base", 8)
    assert capsys.readouterr().err == ""  # checked, and found good: nothing to say


def test_mirror_from_environment(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _release_bytes("vit_base", 8)
    mirror.routes["/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"] = ("ok", body)
    monkeypatch.setenv(BASE_URL_ENV, mirror.base_url + "/")
    path = fetch_pretrained("dino_vitb8", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == body


def test_a_redirect_loop_is_one_line(mirror: Mirror, tmp_path: Path) -> None:
    mirror.routes[VITS16_PATH] = ("loop", b"")
    with pytest.raises(PretrainedError, match="HTTP 302") as caught:
        fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)
    assert "\n" not in str(caught.value) and "infinite loop" in str(caught.value)


def test_http_404_is_a_clear_error(mirror: Mirror, tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match="HTTP 404") as caught:
        fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)
    assert mirror.base_url + VITS16_PATH in str(caught.value)
    assert _cache_entries(tmp_path) == []


def test_truncated_download_leaves_no_file(
    mirror: Mirror, vits16_bytes: bytes, tmp_path: Path
) -> None:
    mirror.routes[VITS16_PATH] = ("truncate", vits16_bytes)
    with pytest.raises(PretrainedError, match="truncated"):
        fetch_pretrained(
            "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
        )
    assert _cache_entries(tmp_path) == []
    # The next attempt downloads again instead of trusting a partial file.
    mirror.routes[VITS16_PATH] = ("ok", vits16_bytes)
    path = fetch_pretrained(
        "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
    )
    assert path.stat().st_size == len(vits16_bytes)


def test_a_promised_body_that_never_comes_is_truncated(
    mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror.routes[VITS16_PATH] = ("truncate", b"x")  # Content-Length: 1, then nothing
    with pytest.raises(PretrainedError, match="is truncated: got 0 of 1 bytes"):
        fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)
    assert "dino_vits16: 0 B of 1 B (0%) at 0 B/s" in capsys.readouterr().err
    assert _cache_entries(tmp_path) == []


def test_unreachable_server_explains_the_offline_route(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PretrainedError) as caught:
        fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}")
    message = str(caught.value)
    assert "refused" in message
    assert "--weights PATH" in message
    assert get_spec("dino_vits16").url in message  # where to get the file by hand
    assert str(tmp_path / "dino_deitsmall16_pretrain.pth") in message
    assert _cache_entries(tmp_path) == []


def test_silent_server_times_out(mirror: Mirror, tmp_path: Path) -> None:
    mirror.routes[VITS16_PATH] = ("hang", b"")
    with pytest.raises(PretrainedError, match="did not answer in time"):
        fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, timeout=0.3)
    assert _cache_entries(tmp_path) == []


def test_structure_check_names_what_differs(vits16_state: dict[str, torch.Tensor]) -> None:
    spec = get_spec("dino_vits16")
    verify_structure(vits16_state, spec)  # the real architecture passes

    # A ViT-S/8 file offered as ViT-S/16: the patch kernel and the 28 x 28 + 1 positions differ.
    vits8 = dict(vits16_state)
    vits8["patch_embed.proj.weight"] = torch.empty(384, 3, 8, 8, device="meta")
    vits8["pos_embed"] = torch.empty(1, 785, 384, device="meta")
    with pytest.raises(PretrainedError) as caught:
        verify_structure(vits8, spec)
    message = str(caught.value)
    assert (
        "does not match dino_vits16 (vit_small, patch 16); it has patch size 8, expected 16;"
        in message
    )
    assert "pos_embed: (1, 785, 384) != expected (1, 197, 384)" in message
    assert "patch_embed.proj.weight: (384, 3, 8, 8) != expected (384, 3, 16, 16)" in message
    assert "missing" not in message

    # A full training checkpoint's naming: a head and no final norm.
    partial = {k: v for k, v in vits16_state.items() if not k.startswith("norm.")}
    partial["head.mlp.0.weight"] = torch.empty(2048, 384, device="meta")
    with pytest.raises(PretrainedError) as caught:
        verify_structure(partial, spec)
    message = str(caught.value)
    assert "missing: norm.weight, norm.bias" in message
    assert "unexpected: head.mlp.0.weight" in message

    # The same file is not a ViT-S/8, nor a ViT-B/16 (wider, same depth).
    with pytest.raises(PretrainedError, match=r"does not match dino_vits8 \(vit_small, patch 8\)"):
        verify_structure(vits16_state, get_spec("dino_vits8"))
    with pytest.raises(PretrainedError, match=r"; it has width 384, expected 768;") as caught:
        verify_structure(vits16_state, get_spec("dino_vitb16"))
    assert "patch size" not in str(caught.value)
    assert "blocks" not in str(caught.value).split(";")[1]


def test_unreadable_or_nested_checkpoints_are_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\n  <html>captive portal</html>")
    with pytest.raises(PretrainedError, match="not a PyTorch checkpoint but an HTML page"):
        read_state_dict(garbage)
    garbage.write_bytes(b"\xef\xbb\xbf<!doctype html><html>portal</html>")  # UTF-8 BOM first
    with pytest.raises(PretrainedError, match="not a PyTorch checkpoint but an HTML page"):
        read_state_dict(garbage)

    good = _release_bytes("vit_small", 16)
    half = tmp_path / "half.pth"
    half.write_bytes(good[: len(good) // 2])
    with pytest.raises(PretrainedError) as caught:
        read_state_dict(half)
    message = str(caught.value)
    assert "is not a readable PyTorch checkpoint: it is truncated or damaged" in message
    assert "delete it and fetch it again" in message
    assert "\n" not in message and len(message) < 400  # torch's paragraphs of advice left out

    packed = tmp_path / "packed.pth"
    packed.write_bytes(gzip.compress(good))
    with pytest.raises(PretrainedError, match="is gzip-compressed, not a checkpoint"):
        read_state_dict(packed)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(PretrainedError, match="empty.pth is empty"):
        read_state_dict(empty)

    nested = tmp_path / "full.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)}, "epoch": 3}, nested)
    with pytest.raises(PretrainedError, match=r"not a backbone-only state dict.*'teacher'"):
        read_state_dict(nested)

    with pytest.raises(PretrainedError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def test_default_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert default_cache_dir() == tmp_path / "xdg" / "dino-features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dino-features"


@pytest.mark.parametrize(
    ("mode", "body", "reason"),
    [
        ("nolength", _release_bytes("vit_small", 16), "truncated or damaged"),
        ("badlength", _release_bytes("vit_small", 16), "truncated or damaged"),
        ("gzip", _release_bytes("vit_small", 16), "Content-Encoding: gzip"),
        ("html", HTML_PAGE, "not a PyTorch checkpoint but an HTML page"),
        ("ok", _release_bytes("vit_small", 8), "it has patch size 8, expected 16"),
        ("ok", _release_bytes("vit_base", 16), "it has width 768, expected 384"),
        ("ok", _training_checkpoint(), "not a backbone-only state dict"),
    ],
    ids=["no-length-cut", "bad-length-cut", "gzip", "html-200", "vits8", "vitb16", "full"],
)
def test_an_unusable_download_is_never_cached(
    mirror: Mirror, tmp_path: Path, mode: str, body: bytes, reason: str
) -> None:
    mirror.routes[VITS16_PATH] = (mode, body)
    with pytest.raises(PretrainedError) as caught:
        fetch_pretrained(
            "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
        )
    message = str(caught.value)
    assert reason in message
    assert mirror.base_url + VITS16_PATH in message
    assert "nothing was cached" in message
    if mode in ("nolength", "badlength"):  # nothing to check the length against
        assert f"({len(body) // 2} bytes arrived; the server sent no Content-Length" in message
    assert _cache_entries(tmp_path) == []  # no entry, no partial file

    # A healthy server afterwards: downloaded, not answered from a cache of the bad file.
    good = _release_bytes("vit_small", 16)
    mirror.routes[VITS16_PATH] = ("ok", good)
    path = fetch_pretrained(
        "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
    )
    assert path.read_bytes() == good
    assert mirror.requests == [VITS16_PATH, VITS16_PATH]
    assert mirror.accept_encodings == ["identity", "identity"]


@pytest.mark.parametrize(
    "cached",
    [
        HTML_PAGE,
        _release_bytes("vit_small", 16)[:5000],  # cut off by an older version
        _release_bytes("vit_small", 8),  # another model
    ],
    ids=["html", "truncated", "vits8"],
)
def test_a_bad_cached_file_is_replaced_by_a_new_download(
    mirror: Mirror, tmp_path: Path, cached: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / VITS16_FILE
    target.write_bytes(cached)
    good = _release_bytes("vit_small", 16)
    mirror.routes[VITS16_PATH] = ("ok", good)
    path = fetch_pretrained(
        "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
    )
    assert path == target
    assert path.read_bytes() == good
    assert mirror.requests == [VITS16_PATH]
    assert _cache_entries(tmp_path) == _cached(tmp_path)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the cached {target} ")
    assert "removing it and downloading dino_vits16 again" in err
    assert len(err.strip().splitlines()) == 1

    # From now on the good file is used without a request.
    fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False)
    assert mirror.requests == [VITS16_PATH]


def test_a_bad_cached_file_and_a_failed_download_say_both(
    mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / VITS16_FILE
    target.write_bytes(HTML_PAGE)
    with pytest.raises(PretrainedError) as caught:  # the mirror has no such file: HTTP 404
        fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)
    message = str(caught.value)
    assert message.startswith(f"the cached {target} is not a PyTorch checkpoint but an HTML page")
    assert "so it was removed, and downloading it again failed: downloading dino_vits16" in message
    assert "HTTP 404" in message
    assert "--weights PATH" in message
    assert _cache_entries(tmp_path) == []
    assert "warning: the cached" in capsys.readouterr().err


def test_partial_downloads_of_dead_processes_are_removed(mirror: Mirror, tmp_path: Path) -> None:
    owner = files.owner_tag()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = finished.pid
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    vits8_file = get_spec("dino_vits8").filename

    def partial(owner: str, pid: int, token: str = "0123abcd", name: str = VITS16_FILE) -> str:
        return f".{name}.{owner}.{pid}.{token}.part"

    removed = [
        partial(owner, dead),  # killed on this host (SIGTERM, SIGKILL)
        partial("elsewhere", dead, "4567cdef"),  # another host's, untouched for two hours
        f".{VITS16_FILE}.k2j3_4x9.part",  # an older version's, untouched for two hours
    ]
    kept = [
        partial(owner, sleeper.pid),  # another process, still downloading
        partial(owner, os.getpid()),  # another download of this very process
        partial("elsewhere", dead),  # another host's, written to a moment ago
        f".{VITS16_FILE}.q8w7e6r5.part",  # an older version's, written to a moment ago
        partial(owner, dead, name=vits8_file),  # of another file: left to its own download
    ]
    old = time.time() - 7200
    try:
        for name in removed + kept:
            tmp_path.joinpath(name).write_bytes(b"\0" * 1000)
        for name in removed[1:]:
            os.utime(tmp_path / name, (old, old))
        mirror.routes[VITS16_PATH] = ("ok", _release_bytes("vit_small", 16))
        fetch_pretrained(
            "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
        )
        assert _cache_entries(tmp_path) == sorted(kept + _cached(tmp_path))

        # The next use of the cached file cleans up too, without a request.
        tmp_path.joinpath(removed[0]).write_bytes(b"\0")
        fetch_pretrained(
            "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
        )
        assert _cache_entries(tmp_path) == sorted(kept + _cached(tmp_path))
        assert mirror.requests == [VITS16_PATH]
    finally:
        sleeper.kill()
        sleeper.wait()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_slow_download_shows_progress_as_bytes_arrive(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _release_bytes("vit_small", 16)
    mirror.routes[VITS16_PATH] = ("trickle", body)
    seen: list[list[str]] = []

    def sample() -> None:
        # The last sample comes after 3 of 4 pieces were sent: a client slowed down by a busy
        # machine gets a few seconds to have its partial file.
        entries = _cache_entries(tmp_path)
        deadline = time.monotonic() + 10
        while len(seen) == 2 and not entries and time.monotonic() < deadline:
            time.sleep(0.05)
            entries = _cache_entries(tmp_path)
        seen.append(entries)

    mirror.between_pieces = sample
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fetch_pretrained("dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url)

    draws = terminal.getvalue().split("\r")[1:]
    percents = [int(m.group(1)) for d in draws if (m := re.search(r"\((\d+)%\)", d))]
    assert len(percents) >= 3  # redrawn as pieces arrive, not once at the end
    assert percents[0] <= 25 and percents[-1] == 100
    assert percents == sorted(percents)

    # While it arrives, the body is in one partial file named after this host and process.
    assert len(seen) == 3 and len(seen[-1]) == 1  # seen[0] may come before the file exists
    match = download._partial_pattern(tmp_path / VITS16_FILE).fullmatch(seen[-1][0])
    assert match is not None
    assert (match["owner"], int(match["pid"])) == (files.owner_tag(), os.getpid())
    assert _cache_entries(tmp_path) == _cached(tmp_path)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress_lines(total: int | None, updates: Sequence[tuple[float, int]]) -> list[str]:
    clock, stream = _Clock(), io.StringIO()
    meter = download._Progress("m", total, True, stream=stream, clock=clock)
    for at, received in updates:
        clock.now = 1000.0 + at
        meter.update(received)
    return [line.split(": ", 1)[1].split(" at ")[0] for line in stream.getvalue().splitlines()[1:]]


def test_progress_off_a_terminal_every_tenth_and_every_half_minute() -> None:
    updates = [(0, 10), (10, 20), (31, 30), (45, 40), (46, 150), (47, 160), (80, 170)]
    assert _progress_lines(1000, updates) == [
        "10 B of 1000 B (1%)",  # the first bytes
        "30 B of 1000 B (3%)",  # 30 s later, though no new tenth
        "150 B of 1000 B (15%)",  # a new tenth
        "170 B of 1000 B (17%)",  # 34 s later
    ]
    # Of unknown size: every 30 s.
    assert _progress_lines(None, [(5, 1), (31, 2048), (40, 3000), (62, 4096)]) == [
        "2.0 KiB",
        "4.0 KiB",
    ]


def test_progress_on_a_terminal_is_redrawn_at_most_five_times_a_second() -> None:
    clock, stream = _Clock(), _Terminal()
    meter = download._Progress("m", 4 << 20, True, stream=stream, clock=clock)
    for at, received in [(0.0, 1 << 20), (0.1, 2 << 20), (0.25, 3 << 20), (0.3, 3 << 20)]:
        clock.now = 1000.0 + at
        meter.update(received)
    draws = stream.getvalue().split("\r")[1:]
    assert [d.split(" at ")[0] for d in draws] == [
        "  m: 1.0 MiB of 4.0 MiB (25%)",
        "  m: 3.0 MiB of 4.0 MiB (75%)",
    ]
    assert "/s" not in stream.getvalue()  # no speed from the first bytes
    clock.now = 1003.0
    meter.update(3 << 20)
    assert stream.getvalue().endswith("(75%) at 1.0 MiB/s, about 1 s left")
    meter.end_line()  # an error message then starts on a line of its own
    assert stream.getvalue().endswith("left\n")


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_is_not_blamed_on_the_network(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    body = _release_bytes("vit_small", 16)
    mirror.routes[VITS16_PATH] = ("ok", body)
    if failing == "fsync":

        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", no_space)
    else:
        create = download._create_partial

        def on_a_full_disk(target: Path) -> tuple[Path, Any]:
            path, handle = create(target)
            return path, _FullDisk(handle)

        monkeypatch.setattr(download, "_create_partial", on_a_full_disk)
    with pytest.raises(PretrainedError) as caught:
        fetch_pretrained(
            "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
        )
    message = str(caught.value)
    assert message.startswith(f"could not write {tmp_path / VITS16_FILE}: No space left on device")
    assert "another cache folder (--cache-dir, $DINO_CACHE_DIR)" in message
    assert "broke off" not in message and "Without internet access" not in message
    assert _cache_entries(tmp_path) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_cache_entries_follow_the_umask(
    mirror: Mirror, tmp_path: Path, umask: int, mode: int
) -> None:
    mirror.routes[VITS16_PATH] = ("ok", _release_bytes("vit_small", 16))
    previous = os.umask(umask)
    try:
        path = fetch_pretrained(
            "dino_vits16", cache_dir=tmp_path, base_url=mirror.base_url, progress=False
        )
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    origin = path.with_name(path.name + ORIGIN_SUFFIX)
    assert stat.S_IMODE(origin.stat().st_mode) == mode


def test_an_export_names_the_mirror_it_came_from(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror.routes[VITS16_PATH] = ("ok", _release_bytes("vit_small", 16))
    monkeypatch.setenv(BASE_URL_ENV, mirror.base_url)
    loaded = export._load_pretrained("dino_vits16", tmp_path)
    mirrored = f"dino_vits16 from mirror {mirror.base_url}{VITS16_PATH}"
    assert loaded.source == mirrored

    # Used again from the cache with the official server configured: still the mirror's file.
    monkeypatch.delenv(BASE_URL_ENV)
    assert export._load_pretrained("dino_vits16", tmp_path).source == mirrored
    assert mirror.requests == [VITS16_PATH]

    # Replaced by hand with other content: its origin is not known.
    tmp_path.joinpath(VITS16_FILE).write_bytes(_release_bytes("vit_small", 16, fill=1.0))
    source = export._load_pretrained("dino_vits16", tmp_path).source
    assert source == (
        f"dino_vits16 from the cache file {VITS16_FILE} (origin not recorded: placed there by "
        "hand or replaced since its download)"
    )
    assert mirror.requests == [VITS16_PATH]


def test_an_export_is_called_official_only_from_the_release_url(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The local server plays the release server: the registry's URL points at it.
    release_url = mirror.base_url + VITS16_PATH
    spec = dataclasses.replace(get_spec("dino_vits16"), url=release_url)
    monkeypatch.setitem(PRETRAINED, "dino_vits16", spec)
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    mirror.routes[VITS16_PATH] = ("ok", _release_bytes("vit_small", 16))
    loaded = export._load_pretrained("dino_vits16", tmp_path)
    assert loaded.source == f"official dino_vits16 ({release_url})"


def test_an_output_that_is_the_cached_download_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = tmp_path / VITS16_FILE
    cached.write_bytes(_release_bytes("vit_small", 16))
    before = cached.read_bytes()
    link = tmp_path / "model.onnx"
    link.symlink_to(cached)
    for output in (cached, link):
        argv = ["--pretrained", "dino_vits16", "--cache-dir", str(tmp_path), "--output"]
        assert export.main([*argv, str(output)]) == 2
        err = capsys.readouterr().err
        assert f"is the download cache's copy of dino_vits16 ({cached})" in err
        assert "Traceback" not in err
    assert cached.read_bytes() == before
