"""Atomic training checkpoints in the official DINO layout, with corruption detection.

Every checkpoint ``X.pth`` gets a sidecar ``X.pth.sha256`` holding the file's SHA-256. On
resume the digest is checked, and the file is loaded with ``weights_only=True`` (so every
value stored here is a tensor, a number, a string or a container of those).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import file_sha256

CHECKPOINT_NAME = "checkpoint.pth"
DIGEST_SUFFIX = ".sha256"
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "dino_loss")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint cannot be read back: truncated, modified or not a DINO checkpoint."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename) plus its digest.

    Returns:
        The SHA-256 of the written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = file_sha256(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _atomic_write_bytes(
        path.with_name(path.name + DIGEST_SUFFIX), f"{digest}  {path.name}\n".encode()
    )
    return digest


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate a training checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointCorruptError: The file is truncated, does not match its recorded digest,
            cannot be unpickled safely or lacks the DINO training keys.
    """
    path = Path(path)
    digest_file = path.with_name(path.name + DIGEST_SUFFIX)
    if digest_file.is_file():
        recorded = digest_file.read_text().split()[0] if digest_file.read_text().strip() else ""
        actual = file_sha256(path)
        if recorded != actual:
            raise CheckpointCorruptError(
                f"checkpoint {path} is corrupted or was cut short: its SHA-256 {actual[:12]}... "
                f"does not match the recorded {recorded[:12]}... in {digest_file.name}. Delete it "
                "(or restore a copy such as checkpointNNNN.pth) to resume, or use a new "
                "--output_dir."
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... here
        raise CheckpointCorruptError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); "
            "the file is truncated or corrupted. Delete it to start over, or restore a copy."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointCorruptError(f"checkpoint {path} does not hold a dict")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointCorruptError(
            f"{path} is not a DINO training checkpoint (missing keys: {', '.join(missing)})"
        )
    return state
