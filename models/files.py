"""Durable file writes: temporary files created with the user's file mode, and fsync.

A file published by rename must be readable like any other file the user writes (``mkstemp``
creates 0600, which would hide a model from a service running as another user), and it must
be on disk before the rename makes it visible, or a power loss can leave an empty file under
the final name. Temporary files named after their host and process (:func:`owner_tag`,
:func:`pid_alive`) let a later run remove what a killed one left behind, never what a live one
is writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path


def new_temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty, uniquely named file in ``folder`` with mode 0666 less the umask.

    The mode comes from ``os.open``, so the process umask is never changed (changing it, even
    briefly, would affect files other threads create meanwhile).

    Raises:
        OSError: The folder is missing or not writable.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary name in {folder}")  # pragma: no cover


def fsync_file(path: Path) -> None:
    """Flush ``path``'s contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the platform allows."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one existing file (through links, hard links or ``..``).

    False when either cannot be looked at (missing, no permission): writing to ``a`` then
    cannot destroy ``b``.
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# A temporary file of another host (or of a process that cannot be told) is abandoned once
# unwritten this long.
ABANDONED_AFTER_S = 3600.0


def owner_tag() -> str:
    """This host's kernel boot and PID namespace, as a file-name part: the space in which a
    process id names one process.

    The host name alone does not tell two machines apart (clones share it), nor does the PID
    namespace's inode (every machine's first namespace has the same one); the kernel's random
    boot id does. Without it (no ``/proc``), only the host name and namespace are used.
    """
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"
    parts = [host]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text()
        parts.append(re.sub(r"[^0-9a-f]", "", boot.lower())[:12])
    except OSError:
        pass
    with contextlib.suppress(OSError):
        parts.append(re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")))
    return "-".join(part for part in parts if part)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this PID namespace exists (``True`` when that cannot be told)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, as another user's process
        return True
    try:  # a zombie (killed, not yet reaped) writes nothing any more
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1]
    except OSError:
        return True
    return state != ["Z"]
