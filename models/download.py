"""Downloading one file into a cache folder, safely: checked before it is kept, never half-kept.

:func:`download` streams a URL, uncompressed (``Accept-Encoding: identity``), into a partial file
beside its target whose name carries this host, PID namespace and process id; the partial is
renamed into place only once the body has arrived whole and a caller's check accepts it, and its
URL and SHA-256 are recorded beside it (``<file>.origin.json``, read by
:func:`download_origin`). Progress goes to stderr as bytes arrive. A full disk is reported as a
local write error, not a network one. :func:`remove_abandoned_partials` removes partial files
that killed processes left behind, never one that a live process is writing.

Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from models.files import ABANDONED_AFTER_S, owner_tag, pid_alive

ORIGIN_SUFFIX = ".origin.json"
# The most one read asks for; a read returns as soon as any bytes have arrived, so progress moves
# on a slow link too.
_CHUNK_BYTES = 1 << 20
_MIB = float(1 << 20)
# A partial download of another host (or of an older version, whose names carry no process id)
# is removed once nobody has written to it for this long; a live download writes far more often.
_REDRAW_EVERY_S = 0.2  # on a terminal
_LOG_EVERY_S = 30.0  # elsewhere, besides a line every 10 %


class DownloadError(RuntimeError):
    """A download failed or was refused by its check; the message says why, in one line."""


class _WriteError(Exception):
    """Writing the local partial file failed (as opposed to the network)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def describe_network_error(exc: BaseException) -> str:
    """A short human reason for a network failure."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return f"the host name could not be resolved ({reason.strerror}); is this machine offline?"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "the server did not answer in time"
    return str(reason) or type(reason).__name__


def download(
    url: str,
    target: Path,
    *,
    label: str,
    check: Callable[[Path], str | None],
    progress: bool = True,
    timeout: float = 60.0,
    hint: str = "",
    elsewhere: str = "another folder",
) -> None:
    """Stream ``url`` into a partial file beside ``target``, check it, rename it into place.

    The body is asked for uncompressed; it must arrive whole (its ``Content-Length``, when
    given) and pass ``check`` before it becomes ``target``. Its URL and SHA-256 are then recorded
    beside it (:func:`download_origin`). Whatever fails, no partial file is left behind.

    Args:
        url: What to download.
        target: The file to create (its folder must exist).
        label: What it is, in messages (``dino_vits16``).
        check: Called on the complete partial file: ``None`` if usable, else why not, as words
            that complete "<the download> ..."; it may raise ``OSError``.
        progress: Write a progress line to stderr.
        timeout: Seconds to wait for the connection and for each read.
        hint: Appended to network failures (what to do offline).
        elsewhere: Where else the file could go, named when the disk is full.

    Raises:
        DownloadError: The request, the transfer, the check or the local write failed.
    """
    request = urllib.request.Request(
        url, headers={"User-Agent": "dino-features", "Accept-Encoding": "identity"}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(
            f"downloading {label} from {url} failed: HTTP {exc.code} "
            f"{' '.join(str(exc.reason).split())}. {hint}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(
            f"could not download {label} from {url}: {describe_network_error(exc)}. {hint}"
        ) from None
    except ValueError as exc:  # a malformed mirror URL
        raise DownloadError(f"invalid download URL {url!r}: {exc}") from None

    with response:
        encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise DownloadError(
                f"{url} sent {label} with Content-Encoding: {encoding} although an uncompressed "
                f"file was asked for; nothing was cached. Check the server's configuration. "
                f"{hint}"
            )
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        meter = _Progress(label, expected, progress)
        try:
            partial, handle = _create_partial(target)
        except OSError as exc:  # the cache folder is not writable, ...
            raise DownloadError(f"cannot write {target}: {exc.strerror or exc}") from None
        try:
            try:
                received, sha256 = _copy(response, handle, meter)
            except _WriteError as exc:
                message = _write_failure(target, label, exc.error, expected, elsewhere)
                raise DownloadError(message) from None
            except http.client.IncompleteRead:
                raise DownloadError(
                    f"the download of {label} from {url} is truncated: the server closed "
                    f"the connection early. Try again; {hint}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                reason = describe_network_error(exc)
                raise DownloadError(
                    f"the download of {label} from {url} broke off: {reason}. {hint}"
                ) from None
            finally:
                meter.end_line()
                with contextlib.suppress(OSError):
                    handle.close()
            if expected is not None and received != expected:
                raise DownloadError(
                    f"the download of {label} from {url} is truncated: got {received} of "
                    f"{expected} bytes. Try again; {hint}"
                )
            if received == 0:
                raise DownloadError(f"{url} sent an empty file for {label}. {hint}")
            try:
                problem = check(partial)
            except OSError as exc:
                raise DownloadError(
                    f"cannot read back the downloaded {partial}: {exc.strerror or exc}"
                ) from None
            if problem is not None:
                unchecked = (
                    f" ({received} bytes arrived; the server sent no Content-Length to check "
                    "them against)"
                    if expected is None
                    else ""
                )
                raise DownloadError(
                    f"the download of {label} from {url} {problem}{unchecked}; nothing was "
                    f"cached. Check the server or try again later. {hint}"
                )
            try:
                os.replace(partial, target)
            except OSError as exc:
                raise DownloadError(f"cannot write {target}: {exc.strerror or exc}") from None
            _record_origin(target, url, sha256)
        finally:
            partial.unlink(missing_ok=True)


def _write_failure(
    target: Path, label: str, error: OSError, expected: int | None, elsewhere: str
) -> str:
    """The message for a failed write of the local file (a full disk, a quota, an I/O error)."""
    size = f"; the file is {_size(expected)}" if expected is not None else ""
    return (
        f"could not write {target}: {error.strerror or error} (while downloading {label}{size}). "
        f"Nothing was cached; free some space in {target.parent} or use {elsewhere}"
    )


def _partial_pattern(target: Path) -> re.Pattern[str]:
    """Names of partial downloads of ``target``: ``.<name>.<owner>.<pid>.<token>.part``."""
    return re.compile(
        rf"\.{re.escape(target.name)}\.(?P<owner>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.part"
    )


def _create_partial(target: Path) -> tuple[Path, IO[bytes]]:
    """A new, empty partial file beside ``target``, named after this host and process.

    It is created with mode 0666 less the umask, like any file the user writes (a temporary
    file would be 0600, and the cache entry unreadable to others sharing the cache).
    """
    name = f".{target.name}.{owner_tag()}.{os.getpid()}.{secrets.token_hex(4)}.part"
    partial = target.parent / name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(partial, flags, 0o666)
    return partial, os.fdopen(fd, "wb")


def remove_abandoned_partials(target: Path) -> None:
    """Remove partial downloads of ``target`` left by processes that died without cleaning up
    (SIGTERM, SIGKILL, a power cut); never one that a live process is writing.

    A partial named after this host and PID namespace goes when its process is gone; any other
    (another host's, or an older version's without a process id) once unwritten for an hour.
    """
    pattern = _partial_pattern(target)
    prefix = f".{target.name}."
    owner = owner_tag()
    try:
        entries = [entry for entry in target.parent.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.name.endswith(".part"):
            continue
        match = pattern.fullmatch(entry.name)
        if match is not None and match["owner"] == owner:
            if pid_alive(int(match["pid"])):
                continue
        else:  # another host's, or an older version's: only its age tells
            try:
                if now - entry.stat().st_mtime < ABANDONED_AFTER_S:
                    continue
            except OSError:
                continue
        with contextlib.suppress(OSError):
            entry.unlink()


def origin_path(target: Path) -> Path:
    """Where the URL and digest of ``target``'s download are recorded."""
    return target.with_name(target.name + ORIGIN_SUFFIX)


def _record_origin(target: Path, url: str, sha256: str) -> None:
    """Write ``<target>.origin.json`` (URL and digest), atomically; best effort, since without it
    an export only says that the origin was not recorded."""
    origin = origin_path(target)
    record = json.dumps({"url": url, "sha256": sha256}) + "\n"
    try:
        partial, handle = _create_partial(origin)
    except OSError:
        return
    try:
        with handle:
            handle.write(record.encode("utf-8"))
        os.replace(partial, origin)
    except OSError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def _copy(source: http.client.HTTPResponse, sink: IO[bytes], meter: _Progress) -> tuple[int, str]:
    """Copy the body as it arrives, reporting progress; returns the byte count and SHA-256.

    Network errors propagate as they are; a failed write or sync of ``sink`` is a
    :class:`_WriteError`.
    """
    digest = hashlib.sha256()
    received = 0
    while chunk := source.read1(_CHUNK_BYTES):
        try:
            sink.write(chunk)
        except OSError as exc:
            raise _WriteError(exc) from None
        digest.update(chunk)
        received += len(chunk)
        meter.update(received)
    try:
        sink.flush()
        os.fsync(sink.fileno())
        sink.close()
    except OSError as exc:
        raise _WriteError(exc) from None
    meter.close(received)
    return received, digest.hexdigest()


def _size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    if count < _MIB:
        return f"{count / 1024:.1f} KiB"
    return f"{count / _MIB:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


class _Progress:
    """A download progress line on stderr: rewritten in place on a terminal (at most every
    0.2 s), else a line every 10 % and at least every 30 s while bytes arrive."""

    def __init__(
        self,
        label: str,
        total: int | None,
        enabled: bool,
        *,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = label
        self._total = total
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._tty = self._stream.isatty()
        self._start = clock()
        self._last_draw: float | None = None
        self._last_line = self._start
        self._last_decile = -1
        self._open_line = False
        if enabled:
            size = _size(total) if total is not None else "unknown size"
            self._write(f"Downloading {label} ({size})\n")

    def _line(self, received: int, now: float, *, final: bool = False) -> str:
        elapsed = now - self._start
        rate = received / max(elapsed, 1e-6)
        if self._total:
            done = f"{_size(received)} of {_size(self._total)} ({100 * received // self._total}%)"
        else:
            done = _size(received)
        if not final and elapsed < 0.5:  # the first bytes tell nothing of the speed yet
            return f"  {self._label}: {done}"
        line = f"  {self._label}: {done} at {_size(rate)}/s"
        if self._total and rate > 0 and not final and elapsed >= 1.0:
            remaining = (self._total - received) / rate
            if remaining >= 1.0:
                line += f", about {_duration(remaining)} left"
        return line

    def update(self, received: int) -> None:
        if not self._enabled:
            return
        now = self._clock()
        if self._tty:
            if self._last_draw is None or now - self._last_draw >= _REDRAW_EVERY_S:
                self._last_draw = now
                self._open_line = True
                self._write("\r" + self._line(received, now))
            return
        decile = 10 * received // self._total if self._total else -1
        new_decile = self._last_decile < decile < 10
        if new_decile or now - self._last_line >= _LOG_EVERY_S:
            self._last_decile = max(self._last_decile, decile)
            self._last_line = now
            self._write(self._line(received, now) + "\n")

    def close(self, received: int) -> None:
        if self._enabled:
            self._open_line = False
            line = self._line(received, self._clock(), final=True)
            self._write(("\r" if self._tty else "") + line + "\n")

    def end_line(self) -> None:
        """End a progress line left open on a terminal, so that a message starts on its own."""
        if self._open_line:
            self._open_line = False
            self._write("\n")

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


def download_origin(path: Path, sha256: str) -> str | None:
    """The URL that :func:`download` fetched ``path`` from.

    Args:
        path: A cache entry.
        sha256: Hex digest of the file as it is now.

    Returns:
        The recorded URL, or ``None`` when nothing was recorded for exactly this content (a
        file placed by hand, or replaced since).
    """
    try:
        record = json.loads(origin_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("sha256") != sha256:
        return None
    url = record.get("url")
    return url if isinstance(url, str) else None
