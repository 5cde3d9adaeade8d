"""The official DINO backbones: names, release URLs, a checked cached download, a structure check.

``fetch_pretrained("dino_vits16", cache_dir=...)`` downloads the backbone-only checkpoint of the
facebookresearch/dino release (the teacher's weights, a plain ``state_dict`` with no head) with
:func:`models.download.download` (standard library only). The download becomes a cache entry
only once it has arrived whole, loads as a checkpoint and holds exactly the named architecture's
tensors, so an HTML page, a cut-off or compressed body or another model never does. A cached
file is checked the same way before it is used, and one that fails is removed and downloaded
again. The URL of each download is recorded beside it, so that an export can name where its
weights really came from (:func:`describe_source`). ``verify_structure`` compares a loaded state
dict with :class:`models.vit.VisionTransformer` built for the named architecture and names every
missing, unexpected or mis-shaped tensor.

Offline, every failure is a :class:`PretrainedError` that says how to bring the file in by hand.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.download import (
    DownloadError,
    download,
    download_origin,
    origin_path,
    remove_abandoned_partials,
)

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dino"
BASE_URL_ENV = "DINO_PRETRAINED_BASE_URL"
CACHE_DIR_ENV = "DINO_CACHE_DIR"
_SNIFF_BYTES = 512


class PretrainedError(RuntimeError):
    """The official weights could not be fetched, read or matched to their architecture."""


class _UnusableError(Exception):
    """A file that is not the expected checkpoint; the message completes "<file> ..."."""


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

    Whatever is returned has been loaded (tensors only) and holds exactly the tensors of the
    named architecture. A cached file that does not is reported on stderr, removed and
    downloaded again, once. Partial downloads of the same file left by dead processes are
    removed first.

    Args:
        name: A key of :data:`PRETRAINED`.
        cache_dir: Folder of the cache; created when missing. A valid checkpoint of the right
            name there is used without a request, also one placed there by hand.
        base_url: Mirror of the release root, keeping its ``<stem>/<stem>.pth`` layout.
            ``None`` reads ``$DINO_PRETRAINED_BASE_URL``, else uses the official server.
        progress: Write a progress line to stderr while downloading.
        timeout: Seconds to wait for the connection and for each read.

    Returns:
        The cached checkpoint file.

    Raises:
        PretrainedError: Unknown name, an unreadable cached file, an unwritable cache or a full
            disk, no network, an HTTP error, a timeout, a truncated, compressed or otherwise
            unusable download or one of another architecture (nothing of it is cached and no
            partial file is left behind).
    """
    spec = get_spec(name)
    target = cache_dir / spec.filename
    remove_abandoned_partials(target)
    rejected: str | None = None
    if target.is_file():
        rejected = _check_cached(target, spec)
        if rejected is None:
            return target
    if base_url is None:
        base_url = os.environ.get(BASE_URL_ENV) or None
    url = spec.url_for(base_url)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PretrainedError(f"cannot create the cache folder {cache_dir}: {exc}") from None
    try:
        download(
            url,
            target,
            label=spec.name,
            check=lambda path: _problem(path, spec),
            progress=progress,
            timeout=timeout,
            hint=offline_hint(spec, cache_dir),
            elsewhere=f"another cache folder (--cache-dir, ${CACHE_DIR_ENV})",
        )
    except DownloadError as exc:
        if rejected is None:
            raise PretrainedError(str(exc)) from None
        raise PretrainedError(
            f"the cached {target} {rejected}, so it was removed, and downloading it again "
            f"failed: {exc}"
        ) from None
    return target


def describe_source(spec: PretrainedSpec, path: Path, sha256: str) -> str:
    """Where the cached checkpoint of ``spec`` came from, for an export's metadata.

    Only a file downloaded from the official URL is called official; a mirror is named as such,
    and a file whose download was not recorded says so.

    Args:
        spec: The release entry.
        path: Its cache entry.
        sha256: Hex digest of that file.
    """
    url = download_origin(path, sha256)
    if url == spec.url:
        return f"official {spec.name} ({url})"
    if url is not None:
        return f"{spec.name} from mirror {url}"
    return (
        f"{spec.name} from the cache file {path.name} (origin not recorded: placed there by hand "
        "or replaced since its download)"
    )


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def _check_cached(target: Path, spec: PretrainedSpec) -> str | None:
    """``None`` when the cached file is usable; else why not, after removing it.

    Raises:
        PretrainedError: The file cannot be read at all, or cannot be removed.
    """
    try:
        before = target.stat()
        problem = _problem(target, spec)
    except OSError as exc:
        raise PretrainedError(
            f"cannot read the cached checkpoint {target}: {exc.strerror or exc}; fix its "
            f"permissions, delete it, or use another cache folder (--cache-dir, ${CACHE_DIR_ENV})"
        ) from None
    if problem is None:
        return None
    _warn(
        f"the cached {target} {problem}; removing it and downloading {spec.name} again "
        "(if you placed it there by hand, it is not the release file)"
    )
    try:
        now = target.stat()
        # Leave alone a file that another process has put there meanwhile.
        if (now.st_dev, now.st_ino, now.st_mtime_ns) == (
            before.st_dev,
            before.st_ino,
            before.st_mtime_ns,
        ):
            target.unlink()
            with contextlib.suppress(OSError):  # its record goes with it, not a newer file's
                origin_path(target).unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PretrainedError(
            f"the cached {target} {problem}, and it cannot be removed ({exc.strerror or exc}); "
            "delete it by hand and run again"
        ) from None
    return problem


def _sniffed_problem(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when clearly not a checkpoint."""
    if not head:
        return "is empty"
    if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"<":  # (after a UTF-8 BOM)
        return (
            "is not a PyTorch checkpoint but an HTML page (a login, error or captive-portal page?)"
        )
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed, not a checkpoint as released"
    return None


def _load_problem(head: bytes, exc: BaseException) -> str:
    """Why ``torch.load`` failed, in words, from the exception and the file's first bytes."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""  # torch adds paragraphs of advice
    detail = f"{type(exc).__name__}: {first}"
    if "weights only load failed" in str(exc).lower():
        return (
            "holds Python objects besides tensors (a full training checkpoint?), not a "
            f"backbone-only state dict ({detail})"
        )
    if head.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive, or a legacy pickle
        return f"is not a readable PyTorch checkpoint: it is truncated or damaged ({detail})"
    return f"is not a readable PyTorch checkpoint ({detail})"


def _load_state_dict(path: Path) -> dict[str, Any]:
    """Load ``path`` as a flat name -> tensor mapping (tensors only) onto the CPU.

    Raises:
        _UnusableError: It is not one; the message completes "<file> ...".
        OSError: The file cannot be opened or read.
    """
    import torch

    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    sniffed = _sniffed_problem(head)
    if sniffed is not None:
        raise _UnusableError(sniffed)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise _UnusableError(_load_problem(head, exc)) from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        keys = list(loaded)[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise _UnusableError(f"is not a backbone-only state dict (name -> tensor); found {keys}")
    return dict(loaded)


def _problem(path: Path, spec: PretrainedSpec) -> str | None:
    """Why ``path`` is not the release file of ``spec`` (completing "<file> ..."), or ``None``.

    Raises:
        OSError: The file cannot be opened or read.
    """
    try:
        state_dict = _load_state_dict(path)
    except _UnusableError as exc:
        return str(exc)
    return _structure_problem(state_dict, spec)


def read_state_dict(path: Path) -> dict[str, Any]:
    """Load a backbone-only checkpoint (tensors only, ``weights_only``) onto the CPU.

    Raises:
        PretrainedError: Missing or unreadable file, or not a flat ``name -> tensor`` mapping.
    """
    if not path.is_file():
        raise PretrainedError(f"checkpoint {path} does not exist")
    try:
        return _load_state_dict(path)
    except OSError as exc:
        raise PretrainedError(f"cannot read {path}: {exc.strerror or exc}") from None
    except _UnusableError as exc:
        raise PretrainedError(
            f"{path} {exc}; if it is a damaged download, delete it and fetch it again"
        ) from None


@lru_cache(maxsize=8)
def _expected_shapes(arch: str, patch_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the architecture, built once per (arch, patch size) on the
    meta device (shapes only, no memory, no initialisation time)."""
    import torch

    from models.vit import VisionTransformer, vit_config

    with torch.device("meta"), torch.no_grad():
        model = VisionTransformer(vit_config(arch, patch_size))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _depth(keys: Any) -> int:
    return len({key.split(".")[1] for key in keys if key.startswith("blocks.")})


def _structure_problem(state_dict: Mapping[str, Any], spec: PretrainedSpec) -> str | None:
    """Why ``state_dict`` is not ``spec``'s architecture (completing "<file> ..."), or ``None``."""
    expected = _expected_shapes(spec.arch, spec.patch_size)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} != expected {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    if not (missing or unexpected or mismatched):
        return None
    # The architecture in a few words first: patch size, width and depth.
    notes = []
    kernel = state_dict.get("patch_embed.proj.weight")
    want_width = expected["patch_embed.proj.weight"][0]
    if kernel is not None and len(kernel.shape) == 4:
        if kernel.shape[-1] != spec.patch_size:
            notes.append(f"it has patch size {kernel.shape[-1]}, expected {spec.patch_size}")
        if kernel.shape[0] != want_width:
            notes.append(f"it has width {kernel.shape[0]}, expected {want_width}")
    depth, want_depth = _depth(state_dict), _depth(expected)
    if depth and depth != want_depth:
        notes.append(f"it has {depth} blocks, expected {want_depth}")
    problems = [", ".join(notes)] if notes else []
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
    return f"does not match {spec.name} ({spec.arch}, patch {spec.patch_size}); " + "; ".join(
        problems
    )


def verify_structure(state_dict: Mapping[str, Any], spec: PretrainedSpec) -> None:
    """Check that ``state_dict`` has exactly the tensors of ``spec``'s architecture.

    Args:
        state_dict: Name -> tensor (anything with a ``shape``), e.g. from :func:`read_state_dict`.
        spec: The release entry it should match.

    Raises:
        PretrainedError: Naming the architecture's differences (patch size, width, depth) and
            the missing, unexpected and mis-shaped keys.
    """
    problem = _structure_problem(state_dict, spec)
    if problem is not None:
        raise PretrainedError(f"the checkpoint {problem}")
