"""Atomic training checkpoints in the official DINO layout, with corruption detection.

Every checkpoint ``X.pth`` gets a sidecar ``X.pth.sha256`` holding the file's SHA-256
(``sha256sum`` format). On resume the digest is checked, and the file is loaded with
``weights_only=True`` (so every value stored here is a tensor, a number, a string or a
container of those).

Replacing a checkpoint is crash-consistent: the sidecar first lists the digests of both the
new and the old file, then the file is renamed into place, then the sidecar is rewritten with
the new digest alone. Whenever the process dies, the file on disk matches a recorded digest.
A copy restored by hand (``cp checkpoint0010.pth checkpoint.pth``) is recognised by the
digest in its own sidecar (``checkpoint0010.pth.sha256``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import file_sha256, load_failure, weights_only_refusal
from models.files import fsync_folder, new_temp_file

CHECKPOINT_NAME = "checkpoint.pth"
DIGEST_SUFFIX = ".sha256"
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "dino_loss")

logger = logging.getLogger("training")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint cannot be read back: truncated, modified or not a DINO checkpoint."""


class CheckpointReadError(OSError):
    """A checkpoint the system will not let this process read (permission denied, an I/O
    error): its contents are not in question."""


def _publish(tmp: Path, path: Path) -> None:
    """Make the complete temporary file ``tmp`` the file ``path`` (one atomic rename)."""
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = new_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def digest_path(path: Path) -> Path:
    """The sidecar of a checkpoint: ``X.pth`` -> ``X.pth.sha256``."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def recorded_digests(path: Path) -> list[str]:
    """Digests listed in the sidecar of ``path`` (empty when there is none or it is unreadable)."""
    try:
        text = digest_path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _digest_lines(name: str, digests: list[str]) -> bytes:
    return "".join(f"{digest}  {name}\n" for digest in digests).encode()


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename) plus its digest.

    Returns:
        The SHA-256 of the written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with tmp.open("wb") as handle:
            try:
                torch.save(state, handle)
            except RuntimeError as err:
                # torch turns a failed write (a full disk) into "[enforce fail at
                # inline_container.cc] unexpected pos": the OSError is its context.
                failure = err.__context__
                if isinstance(failure, OSError):
                    raise OSError(failure.errno, failure.strerror, str(tmp)) from err
                raise
            handle.flush()
            os.fsync(handle.fileno())
        digest = file_sha256(tmp)
        if path.is_file():  # until the rename below, either file may be the one on disk
            previous = recorded_digests(path) or [file_sha256(path)]
            both = [digest, *(d for d in previous if d != digest)]
            _atomic_write_bytes(digest_path(path), _digest_lines(path.name, both))
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _atomic_write_bytes(digest_path(path), _digest_lines(path.name, [digest]))
    return digest


LOCK_NAME = ".lock"
"""File in ``--output_dir`` that the run owning the folder holds locked."""


class OutputDirInUseError(Exception):
    """Another live run holds the output folder's lock."""


@contextlib.contextmanager
def output_dir_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (``flock`` on :data:`LOCK_NAME`) for the life of a run.

    Two runs in one folder would resume from each other's checkpoints, write every epoch's
    log lines twice and delete each other's saves in progress. The kernel drops the lock when
    its process ends, however it ends, so a killed run never leaves a stale lock behind. In a
    folder this process cannot write, the lock is taken on the existing file read-only, or not
    at all when there is none: such a run can only find that it has nothing left to do (one
    with work left stops at its write check).

    Raises:
        OutputDirInUseError: Another process holds the lock (its pid is in the message).
    """
    path = folder / LOCK_NAME
    opened = _open_lock_file(path)
    if opened is None:
        yield
        return
    fd, writable = opened
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputDirInUseError(
                f"--output_dir {folder} is in use by another run (pid {holder}, which holds "
                f"{path}); wait for it to end, or use another --output_dir"
            ) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock_file(path: Path) -> tuple[int, bool] | None:
    """``(fd, writable)`` of the lock file: created read-write, else the existing one read-only;
    None when neither can be opened (a folder this process cannot write, without one)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except OSError:
        pass
    try:
        return os.open(path, os.O_RDONLY), False
    except OSError:
        return None


_STALE_TEMP = re.compile(r"\.(checkpoint(\d+)?\.pth(\.sha256)?|config\.yaml)\.[A-Za-z0-9_]+\.tmp")


def remove_stale_temps(folder: Path) -> int:
    """Delete the temporary files a killed save (of a checkpoint, its digest or
    ``config.yaml``) left in ``folder``; returns how many.

    A save cut short by SIGKILL (the out-of-memory killer, ``kill -9``, a node failure) leaves
    ``.checkpoint.pth.<random>.tmp``, as large as a checkpoint; one run owns its output folder
    (:func:`output_dir_lock`), so at its start no other save can be writing them.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if _STALE_TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed += 1
    return removed


def _sibling_with_digest(path: Path, digest: str) -> Path | None:
    """Another checkpoint in the folder whose sidecar records ``digest`` (a restored copy)."""
    for sidecar in sorted(path.parent.glob(f"*.pth{DIGEST_SUFFIX}")):
        sibling = sidecar.with_name(sidecar.name.removesuffix(DIGEST_SUFFIX))
        if sibling != path and digest in recorded_digests(sibling):
            return sibling
    return None


_SYSTEM_READ_ERRORS = frozenset({errno.EIO, errno.EACCES, errno.EPERM})


def _read_failure(path: Path, err: OSError) -> CheckpointReadError:
    """The error for a checkpoint the system will not let this process read (its contents
    are not in question: nothing suggests deleting it)."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.filename is not None and str(err.filename) != str(path):
        reason += f": {err.filename}"
    return CheckpointReadError(
        f"cannot read the checkpoint {path} to resume from it ({reason}); make it readable by "
        "this user (its permissions, the storage it is on) and rerun, or use another "
        "--output_dir"
    )


def _sidecar_digests(path: Path) -> list[str]:
    """The digests recorded for ``path``; a sidecar that exists must be readable.

    Only a missing sidecar (a checkpoint from elsewhere) skips the digest check: one that
    cannot be read or decoded would otherwise skip it silently.

    Raises:
        CheckpointReadError: The sidecar cannot be read (permission denied, an I/O error).
        CheckpointCorruptError: The sidecar is not text.
    """
    sidecar = digest_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise _read_failure(path, err) from err
    except UnicodeDecodeError:
        raise CheckpointCorruptError(
            f"the digest file {sidecar} is damaged (not text). In {path.parent}: to resume "
            f"from {path.name} as it is (if it is a valid checkpoint), delete only "
            f"{sidecar.name}; to start over, delete both files or use a new --output_dir."
        ) from None
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate a training checkpoint written by :func:`save_checkpoint`.

    A digest mismatch stays fatal even when the file would load: a write torn by a crash can
    leave a file whose archive is whole but whose tensors are not, and it must never be
    resumed silently. The message says how to resume from a checkpoint copied in on purpose
    (delete only the sidecar).

    Raises:
        CheckpointCorruptError: The file is truncated, does not match its recorded digest,
            cannot be unpickled safely or lacks the DINO training keys.
        CheckpointReadError: The file or its digest sidecar cannot be opened or read
            (permission denied, an I/O error): the system refuses it, whatever it holds.
    """
    path = Path(path)
    recorded = _sidecar_digests(path)
    if recorded:
        try:
            actual = file_sha256(path)
        except OSError as err:
            raise _read_failure(path, err) from err
        if actual not in recorded:
            copy_of = _sibling_with_digest(path, actual)
            if copy_of is None:
                sidecar = digest_path(path).name
                raise CheckpointCorruptError(
                    f"checkpoint {path} does not match its recorded digest: its SHA-256 "
                    f"{actual[:12]}... is not the one in {sidecar} ({recorded[0][:12]}...). "
                    "Either it is cut short or corrupted, or another file replaced it (a "
                    f"checkpoint copied in from another run). In {path.parent}: to resume from "
                    f"the file as it is (if it is a valid checkpoint), delete only {sidecar}; "
                    f"to resume from an earlier copy, copy it with its digest: cp "
                    f"checkpointNNNN.pth {path.name} && cp checkpointNNNN.pth{DIGEST_SUFFIX} "
                    f"{sidecar}; to start over, delete both files or use a new --output_dir."
                )
            logger.info("%s is a copy of %s (same SHA-256)", path, copy_of.name)
    try:  # can it be opened and read at all? (permissions, the storage)
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise _read_failure(path, err) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... here
        # Only errors of the system itself are not about the contents: torch's zip reader
        # raises OSError(EINVAL) for some files cut short.
        if isinstance(err, OSError) and err.errno in _SYSTEM_READ_ERRORS:
            raise _read_failure(path, err) from err
        refused = weights_only_refusal(err)
        if refused:
            raise CheckpointCorruptError(
                f"{path} is not a training.pretrain checkpoint: it {refused}. Official DINO "
                "checkpoints cannot be resumed; move it away or use another --output_dir."
            ) from err
        raise CheckpointCorruptError(
            f"checkpoint {path} cannot be read ({load_failure(err)}); the file is truncated or "
            "corrupted, or not a checkpoint. Delete it to start over, or restore a copy."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointCorruptError(f"checkpoint {path} does not hold a dict")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointCorruptError(
            f"{path} is not a DINO training checkpoint (missing keys: {', '.join(missing)})"
        )
    wrong = [
        f"{key} is {type(state[key]).__name__}"
        for key in (*REQUIRED_KEYS, "fp16_scaler")
        if key != "epoch" and key in state and not _is_state_dict(state[key])
    ]
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        wrong.append(f"epoch is {epoch!r}, not a count of epochs")
    if wrong:
        raise CheckpointCorruptError(
            f"{path} is not a DINO training checkpoint ({'; '.join(wrong)}); move it away or "
            "use another --output_dir"
        )
    return state


def _is_state_dict(value: Any) -> bool:
    """A dict with string keys, as ``state_dict()`` returns."""
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)
