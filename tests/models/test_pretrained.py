"""models.pretrained against a local mirror of the DINO release (loopback HTTP only)."""

from __future__ import annotations

import http.server
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from models.pretrained import (
    BASE_URL_ENV,
    CACHE_DIR_ENV,
    OFFICIAL_BASE_URL,
    PRETRAINED,
    PretrainedError,
    default_cache_dir,
    fetch_and_verify,
    fetch_pretrained,
    get_spec,
    read_state_dict,
    verify_structure,
)
from models.vit import VisionTransformer, vit_config

VITS16_PATH = "/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"


@dataclass
class Mirror:
    """What the local server serves: path -> (mode, body); and what it was asked for."""

    base_url: str
    routes: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


def _handler(mirror: Mirror) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            mirror.requests.append(self.path)
            mode, body = mirror.routes.get(self.path, ("missing", b""))
            if mode == "missing":
                self.send_error(404, "Not Found")
                return
            if mode == "hang":  # accept, then never answer within the client's timeout
                mirror.release.wait(5.0)
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode == "truncate":  # promise the whole body, send half, hang up
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
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


def _cache_entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


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
    path = fetch_and_verify("dino_vits16", cache_dir=cache, base_url=mirror.base_url)

    assert path == cache / "dino_deitsmall16_pretrain.pth"
    assert path.read_bytes() == vits16_bytes
    assert _cache_entries(cache) == [path.name]  # no temporary file left
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


def test_a_file_placed_by_hand_is_used_offline(tmp_path: Path) -> None:
    spec = get_spec("dino_vitb8")
    placed = tmp_path / spec.filename
    placed.write_bytes(b"copied from another machine")
    # An unroutable mirror proves no connection is attempted.
    path = fetch_pretrained("dino_vitb8", cache_dir=tmp_path, base_url="http://127.0.0.1:9")
    assert path == placed


def test_mirror_from_environment(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = b"\x00weights of a mirror\xff" * 1000
    mirror.routes["/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"] = ("ok", body)
    monkeypatch.setenv(BASE_URL_ENV, mirror.base_url + "/")
    path = fetch_pretrained("dino_vitb8", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == body


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

    # The same file is not a ViT-S/8.
    with pytest.raises(PretrainedError, match=r"does not match dino_vits8 \(vit_small, patch 8\)"):
        verify_structure(vits16_state, get_spec("dino_vits8"))


def test_unreadable_or_nested_checkpoints_are_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(PretrainedError, match="not a readable PyTorch checkpoint"):
        read_state_dict(garbage)

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
