"""Durable file writes: temporary files with the user's mode, no umask changes."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from models import files
from models.files import fsync_file, fsync_folder, new_temp_file, same_file


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_temporary_files_get_the_users_mode(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = new_temp_file(tmp_path, ".x.", ".tmp")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.parent == tmp_path and path.name.startswith(".x.") and path.name.endswith(".tmp")
    assert path.stat().st_size == 0


def test_temporary_names_are_unique_and_the_umask_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_umask(_mask: int) -> int:
        raise AssertionError("os.umask called: it changes the mode of other threads' files")

    monkeypatch.setattr(os, "umask", no_umask)
    names = {new_temp_file(tmp_path, "t-", ".tmp").name for _ in range(50)}
    assert len(names) == 50


def test_a_missing_folder_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        new_temp_file(tmp_path / "missing", ".x.", ".tmp")


def test_fsync_of_a_file_and_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fsync_file(path)
    fsync_folder(tmp_path)
    assert path.read_bytes() == b"data"
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing")


def test_same_file_sees_through_links_and_detours(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    (tmp_path / "link").symlink_to(path)
    os.link(path, tmp_path / "hard")
    (tmp_path / "sub").mkdir()
    for name in ("f", "link", "hard", "sub/../f"):
        assert same_file(tmp_path / name, path), name
    (tmp_path / "other").write_bytes(b"data")
    assert not same_file(tmp_path / "other", path)
    assert not same_file(tmp_path / "missing", path)  # a new file destroys nothing
    assert not same_file(tmp_path / "missing", tmp_path / "missing")


def test_the_owner_tag_tells_machines_with_one_host_name_apart() -> None:
    # Host name and PID-namespace inode were the same on cloned machines (every first
    # namespace has inode 4026531836): an export on one removed another's live export.
    tag = files.owner_tag()
    assert re.fullmatch(r"[A-Za-z0-9-]+", tag)
    boot = Path("/proc/sys/kernel/random/boot_id")
    if boot.exists():
        assert boot.read_text().strip().replace("-", "")[:12] in tag
