"""The official DINO backbones: names, release URLs, a cached download and a structure check.

``fetch_pretrained("dino_vits16", cache_dir=...)`` downloads the backbone-only checkpoint of the
facebookresearch/dino release (the teacher's weights, a plain ``state_dict`` with no head) with
the standard library only, streaming into a temporary file beside the cache entry and renaming it
into place once the whole body has arrived, so a cache entry is always complete.
``verify_structure`` compares a loaded state dict with :class:`models.vit.VisionTransformer` built
for the named architecture and names every missing, unexpected or mis-shaped tensor.

Offline, every failure is a :class:`PretrainedError` that says how to bring the file in by hand.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dino"
BASE_URL_ENV = "DINO_PRETRAINED_BASE_URL"
CACHE_DIR_ENV = "DINO_CACHE_DIR"
_CHUNK_BYTES = 1 << 20
_MIB = float(1 << 20)


class PretrainedError(RuntimeError):
    """The official weights could not be fetched, read or matched to their architecture."""


@dataclass(frozen=True)
class PretrainedSpec:
    """One released DINO backbone.

    Attributes:
        name: Public name, as in the reference hub entry points (``dino_vits16``).
        arch: Architecture name understood by :func:`models.vit.vit_config`.
        patch_size: Patch side in pixels.
        url: Official download URL.
        filename: File name of the checkpoint (the cache entry's name).
    """

    name: str
    arch: str
    patch_size: int
    url: str
    filename: str

    @property
    def relative_url(self) -> str:
        """The URL path below the release root (``<stem>/<stem>.pth``), kept by mirrors."""
        return self.url.removeprefix(OFFICIAL_BASE_URL + "/")

    def url_for(self, base_url: str | None) -> str:
        """The download URL below ``base_url`` (a mirror), or the official one for ``None``."""
        if base_url is None:
            return self.url
        return f"{base_url.rstrip('/')}/{self.relative_url}"


def _release(name: str, arch: str, patch_size: int, stem: str) -> PretrainedSpec:
    filename = f"{stem}.pth"
    return PretrainedSpec(
        name, arch, patch_size, f"{OFFICIAL_BASE_URL}/{stem}/{filename}", filename
    )


PRETRAINED: dict[str, PretrainedSpec] = {
    spec.name: spec
    for spec in (
        _release("dino_vits16", "vit_small", 16, "dino_deitsmall16_pretrain"),
        _release("dino_vits8", "vit_small", 8, "dino_deitsmall8_pretrain"),
        _release("dino_vitb16", "vit_base", 16, "dino_vitbase16_pretrain"),
        _release("dino_vitb8", "vit_base", 8, "dino_vitbase8_pretrain"),
    )
}


def get_spec(name: str) -> PretrainedSpec:
    """The release entry called ``name``.

    Raises:
        PretrainedError: Unknown name; the message lists the known ones.
    """
    try:
        return PRETRAINED[name]
    except KeyError:
        raise PretrainedError(
            f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED)}"
        ) from None


def default_cache_dir() -> Path:
    """Where downloads are kept: ``$DINO_CACHE_DIR``, else ``$XDG_CACHE_HOME/dino-features``,
    else ``~/.cache/dino-features``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "dino-features"


def offline_hint(spec: PretrainedSpec, cache_dir: Path) -> str:
    """What to do on a machine that cannot reach the release server."""
    return (
        f"Without internet access: download {spec.url} on another machine, copy it here and "
        f"pass it with --weights PATH, or place it at {cache_dir / spec.filename}, where it is "
        "used without a download."
    )


def fetch_pretrained(
    name: str,
    *,
    cache_dir: Path,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Path of the named official checkpoint, downloaded into ``cache_dir`` unless already there.

    Args:
        name: A key of :data:`PRETRAINED`.
        cache_dir: Folder of the cache; created when missing. A file of the right name there is
            used as is (a download only ever lands there complete).
        base_url: Mirror of the release root, keeping its ``<stem>/<stem>.pth`` layout.
            ``None`` reads ``$DINO_PRETRAINED_BASE_URL``, else uses the official server.
        progress: Write a progress line to stderr while downloading.
        timeout: Seconds to wait for the connection and for each read.

    Returns:
        The cached checkpoint file.

    Raises:
        PretrainedError: Unknown name, unwritable cache, no network, an HTTP error, a timeout or
            a truncated download (no partial file is left behind).
    """
    spec = get_spec(name)
    target = cache_dir / spec.filename
    if target.is_file():
        return target
    if base_url is None:
        base_url = os.environ.get(BASE_URL_ENV) or None
    url = spec.url_for(base_url)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PretrainedError(f"cannot create the cache folder {cache_dir}: {exc}") from None
    _download(
        url,
        target,
        label=spec.name,
        progress=progress,
        timeout=timeout,
        hint=offline_hint(spec, cache_dir),
    )
    return target


def _describe(exc: BaseException) -> str:
    """A short human reason for a network failure."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return f"the host name could not be resolved ({reason.strerror}); is this machine offline?"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "the server did not answer in time"
    return str(reason) or type(reason).__name__


def _download(
    url: str, target: Path, *, label: str, progress: bool, timeout: float, hint: str
) -> None:
    """Stream ``url`` into a temporary file beside ``target`` and rename it into place."""
    request = urllib.request.Request(url, headers={"User-Agent": "dino-features"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise PretrainedError(
            f"downloading {label} from {url} failed: HTTP {exc.code} {exc.reason}. {hint}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise PretrainedError(
            f"could not download {label} from {url}: {_describe(exc)}. {hint}"
        ) from None
    except ValueError as exc:  # a malformed mirror URL
        raise PretrainedError(f"invalid download URL {url!r}: {exc}") from None

    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        partial: Path | None = None
        try:
            with tempfile.NamedTemporaryFile(
                "wb", dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
            ) as handle:
                partial = Path(handle.name)
                try:
                    received = _copy(response, handle, _Progress(label, expected, progress))
                    os.fsync(handle.fileno())
                except http.client.IncompleteRead:
                    raise PretrainedError(
                        f"the download of {label} from {url} is truncated: the server closed "
                        f"the connection early. Try again; {hint}"
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise PretrainedError(
                        f"the download of {label} from {url} broke off: {_describe(exc)}. {hint}"
                    ) from None
            if expected is not None and received != expected:
                raise PretrainedError(
                    f"the download of {label} from {url} is truncated: got {received} of "
                    f"{expected} bytes. Try again; {hint}"
                )
            if received == 0:
                raise PretrainedError(f"{url} sent an empty file for {label}. {hint}")
            os.replace(partial, target)
        except OSError as exc:  # the cache folder is not writable, the disk is full, ...
            raise PretrainedError(f"cannot write {target}: {exc}") from None
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)


def _copy(source: http.client.HTTPResponse, sink: IO[bytes], meter: _Progress) -> int:
    """Copy the body in chunks, reporting progress; returns the byte count."""
    received = 0
    while chunk := source.read(_CHUNK_BYTES):
        sink.write(chunk)
        received += len(chunk)
        meter.update(received)
    meter.close(received)
    return received


class _Progress:
    """A download progress line on stderr: rewritten in place on a terminal, else every 10 %."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self._label = label
        self._total = total
        self._enabled = enabled
        self._tty = sys.stderr.isatty()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        if enabled:
            size = f"{total / _MIB:.1f} MiB" if total is not None else "unknown size"
            self._write(f"Downloading {label} ({size})\n")

    def _line(self, received: int) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        done = f"{received / _MIB:.1f}"
        if self._total:
            done += f"/{self._total / _MIB:.1f} MiB ({100 * received // self._total}%)"
        else:
            done += " MiB"
        return f"  {self._label}: {done} at {received / _MIB / elapsed:.1f} MiB/s"

    def update(self, received: int) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                self._write("\r" + self._line(received))
        elif self._total:
            decile = 10 * received // self._total
            if decile > self._last_decile and decile < 10:
                self._last_decile = decile
                self._write(self._line(received) + "\n")

    def close(self, received: int) -> None:
        if self._enabled:
            self._write(("\r" if self._tty else "") + self._line(received) + "\n")

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()


def read_state_dict(path: Path) -> dict[str, Any]:
    """Load a backbone-only checkpoint (tensors only, ``weights_only``) onto the CPU.

    Raises:
        PretrainedError: Missing or unreadable file, or not a flat ``name -> tensor`` mapping.
    """
    import torch

    if not path.is_file():
        raise PretrainedError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise PretrainedError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "if it is a damaged download, delete it and fetch it again"
        ) from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        keys = list(loaded)[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise PretrainedError(
            f"{path} is not a backbone-only state dict (name -> tensor); found {keys}"
        )
    return dict(loaded)


@lru_cache(maxsize=8)
def _expected_shapes(arch: str, patch_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the architecture, built once per (arch, patch size)."""
    import torch

    from models.vit import VisionTransformer, vit_config

    with torch.no_grad():
        model = VisionTransformer(vit_config(arch, patch_size))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def verify_structure(state_dict: Mapping[str, Any], spec: PretrainedSpec) -> None:
    """Check that ``state_dict`` has exactly the tensors of ``spec``'s architecture.

    Args:
        state_dict: Name -> tensor (anything with a ``shape``), e.g. from :func:`read_state_dict`.
        spec: The release entry it should match.

    Raises:
        PretrainedError: Naming the missing, unexpected and mis-shaped keys.
    """
    expected = _expected_shapes(spec.arch, spec.patch_size)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} != expected {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mismatched", mismatched),
    ):
        if items:
            shown = ", ".join(items[:10]) + (
                f", ... ({len(items)} in all)" if len(items) > 10 else ""
            )
            problems.append(f"{title}: {shown}")
    raise PretrainedError(
        f"the checkpoint does not match {spec.name} ({spec.arch}, patch {spec.patch_size}); "
        + "; ".join(problems)
    )


def fetch_and_verify(
    name: str,
    *,
    cache_dir: Path,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """:func:`fetch_pretrained`, then load the file and :func:`verify_structure` it.

    Returns:
        The cached checkpoint, known to hold exactly the named architecture's tensors.

    Raises:
        PretrainedError: As :func:`fetch_pretrained`, :func:`read_state_dict` and
            :func:`verify_structure`.
    """
    spec = get_spec(name)
    path = fetch_pretrained(
        name, cache_dir=cache_dir, base_url=base_url, progress=progress, timeout=timeout
    )
    verify_structure(read_state_dict(path), spec)
    return path
