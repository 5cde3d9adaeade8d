"""Checkpoint files: atomic, crash-consistent digests, restored copies, corruption, file mode."""

from __future__ import annotations

import errno
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from models.checkpoint import file_sha256
from training import checkpoint as ckpt_module
from training.checkpoint import (
    LOCK_NAME,
    CheckpointCorruptError,
    OutputDirInUseError,
    digest_path,
    load_checkpoint,
    output_dir_lock,
    recorded_digests,
    save_checkpoint,
)


def state(value: float) -> dict[str, object]:
    return {
        "student": {"w": torch.full((3,), value)},
        "teacher": {"w": torch.full((3,), value)},
        "optimizer": {},
        "epoch": int(value),
        "dino_loss": {"center": torch.zeros(1, 4)},
    }


def test_round_trip_digest_and_mode(tmp_path):
    path = tmp_path / "checkpoint.pth"
    old_umask = os.umask(0o022)
    try:
        digest = save_checkpoint(state(1), path)
    finally:
        os.umask(old_umask)
    assert recorded_digests(path) == [digest] == [file_sha256(path)]
    assert digest_path(path).read_text() == f"{digest}  checkpoint.pth\n"  # sha256sum format
    assert load_checkpoint(path)["epoch"] == 1
    # Checkpoints get the usual mode (0666 less the umask), like any other output file.
    assert path.stat().st_mode & 0o777 == 0o644
    assert digest_path(path).stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_death_before_the_rename_keeps_the_old_file_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1), path)

    real = ckpt_module._publish

    def die_at_the_checkpoint(tmp, target):
        if target == path:  # the process is killed just before the checkpoint's rename
            raise KeyboardInterrupt
        real(tmp, target)

    monkeypatch.setattr(ckpt_module, "_publish", die_at_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(2), path)
    assert len(recorded_digests(path)) == 2  # the sidecar already names both files
    assert load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_death_before_the_final_digest_keeps_the_new_file_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1), path)
    real = ckpt_module._atomic_write_bytes
    calls = []

    def write_then_die(target, data):
        calls.append(target)
        if len(calls) == 2:  # the single-digest sidecar after the rename
            raise KeyboardInterrupt
        real(target, data)

    monkeypatch.setattr(ckpt_module, "_atomic_write_bytes", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(2), path)
    assert load_checkpoint(path)["epoch"] == 2
    monkeypatch.setattr(ckpt_module, "_atomic_write_bytes", real)
    save_checkpoint(state(3), path)  # the next save cleans the sidecar up
    assert recorded_digests(path) == [file_sha256(path)]


def test_a_restored_copy_is_recognised_and_corruption_is_not(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1), tmp_path / "checkpoint0001.pth")
    save_checkpoint(state(2), path)
    shutil.copyfile(tmp_path / "checkpoint0001.pth", path)  # the user restores epoch 1
    assert load_checkpoint(path)["epoch"] == 1

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"cp checkpointNNNN.pth checkpoint.pth"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"epoch": "abc"}, "epoch is 'abc'"),
        ({"epoch": -5}, "epoch is -5"),
        ({"epoch": True}, "epoch is True"),
        ({"student": [1]}, "student is list"),
        ({"optimizer": None}, "optimizer is NoneType"),
        ({"dino_loss": [0.0]}, "dino_loss is list"),
        ({"teacher": {1: torch.zeros(1)}}, "teacher is dict"),
        ({"fp16_scaler": 3}, "fp16_scaler is int"),
    ],
)
def test_foreign_values_are_refused_with_a_message(tmp_path, change, named):
    """A file with the right keys but values no training run writes is not loaded."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({**state(1), **change}, path)
    with pytest.raises(CheckpointCorruptError, match="not a DINO training checkpoint") as info:
        load_checkpoint(path)
    assert named in str(info.value)


def test_a_pickle_of_python_objects_is_named_not_called_corrupt(tmp_path):
    """An official full checkpoint (argparse.Namespace in it) says what it is, on one line."""
    import argparse

    path = tmp_path / "checkpoint.pth"
    torch.save({**state(1), "args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(CheckpointCorruptError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "needs the Python object argparse.Namespace" in message
    assert "not a training.pretrain checkpoint" in message and "corrupt" not in message
    assert "\n" not in message and "\x1b" not in message


def test_unreadable_bytes_say_why_on_one_line(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointCorruptError, match="truncated or corrupted") as info:
        load_checkpoint(path)
    assert "unknown pickle operation" in str(info.value)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    stale = [
        ".checkpoint.pth.a1b2c3d4e5f6.tmp",  # this version's names
        ".checkpoint0010.pth.k_3xq9ab.tmp",  # mkstemp's, from older versions
        ".checkpoint.pth.sha256.0f0f0f0f0f0f.tmp",
        ".config.yaml.abc123abc123.tmp",
    ]
    kept = [".other.tmp", "checkpoint.pth", ".log.txt.tmp", "notes.checkpoint.pth.x.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".checkpoint.pth.dddddddddddd.tmp").mkdir()  # not a file: left alone
    assert ckpt_module.remove_stale_temps(tmp_path) == len(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*kept, ".checkpoint.pth.dddddddddddd.tmp"]
    )
    assert ckpt_module.remove_stale_temps(tmp_path / "missing") == 0


def test_saving_never_changes_the_process_umask(tmp_path, monkeypatch):
    """Temporary files get their mode from os.open, not by setting the umask to 0 meanwhile
    (which would widen the files other threads create at that moment)."""
    calls: list[int] = []
    real = os.umask

    def spy(mask: int) -> int:
        calls.append(mask)
        return real(mask)

    monkeypatch.setattr(os, "umask", spy)
    save_checkpoint(state(1), tmp_path / "checkpoint.pth")
    assert calls == []


@pytest.mark.parametrize("sidecar", [True, False])
def test_a_checkpoint_the_system_will_not_read_is_not_called_corrupt(
    tmp_path, monkeypatch, sidecar
):
    """Permission denied (chmod 000, which root does not feel: simulated) is reported as what
    it is; the file may be fine, so nothing advises deleting it."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1), path)
    if not sidecar:
        digest_path(path).unlink()  # then torch.load is the first to open it
    real_open = open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ckpt_module.CheckpointReadError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"cannot read the checkpoint {path} to resume from it (Permission denied)" in message
    assert "elete" not in message and "corrupt" not in message and "truncated" not in message
    assert isinstance(info.value, OSError) and not isinstance(info.value, CheckpointCorruptError)


def test_a_checkpoint_copied_in_from_another_run_says_how_to_keep_it(tmp_path):
    """A valid checkpoint copied over checkpoint.pth meets the folder's old sidecar: the
    mismatch stays fatal (a torn write may load too), and the message says that deleting only
    the sidecar resumes from the copied file."""
    other, run = tmp_path / "other", tmp_path / "run"
    save_checkpoint(state(7), other / "checkpoint.pth")
    save_checkpoint(state(2), run / "checkpoint.pth")
    shutil.copyfile(other / "checkpoint.pth", run / "checkpoint.pth")
    with pytest.raises(CheckpointCorruptError) as info:
        load_checkpoint(run / "checkpoint.pth")
    message = str(info.value)
    assert "does not match its recorded digest" in message
    assert "cut short or corrupted, or another file replaced it" in message
    assert "delete only checkpoint.pth.sha256" in message and "\n" not in message
    digest_path(run / "checkpoint.pth").unlink()  # as the message says
    assert load_checkpoint(run / "checkpoint.pth")["epoch"] == 7


def test_a_sidecar_that_exists_but_cannot_be_read_never_skips_the_check(tmp_path, monkeypatch):
    """Only a missing sidecar skips the digest check; an unreadable or damaged one stops the
    load (before, either one let a torn checkpoint load unchecked)."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1), path)
    with path.open("r+b") as handle:  # one byte changed: no longer the recorded digest
        handle.seek(-200, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-200, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    sidecar = digest_path(path)
    real_read_text = pathlib.Path.read_text

    def denied(self, *args, **kwargs):
        if self == sidecar:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    with pytest.raises(ckpt_module.CheckpointReadError, match=f"Permission denied: {sidecar}"):
        load_checkpoint(path)
    monkeypatch.undo()
    good = sidecar.read_bytes()
    sidecar.write_bytes(b"\xff\xfe" + good)
    with pytest.raises(CheckpointCorruptError, match="is damaged \\(not text\\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_a_small_checkpoint_cut_short_is_called_corrupt_not_unreadable(tmp_path, cut):
    """torch's zip reader raises OSError(EINVAL) for some small files cut short near their end:
    that is about the contents, not about permissions."""
    path = tmp_path / "checkpoint.pth"
    saved = state(1)
    saved["padding"] = torch.zeros(2500)  # a 12 KB file: torch's reader then says EINVAL
    save_checkpoint(saved, path)
    digest_path(path).unlink()  # no digest: torch.load is the judge
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(CheckpointCorruptError, match="truncated or corrupted"):
        load_checkpoint(path)


class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def writable(self):
        return True

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)


def full_disk(monkeypatch, room=1000):
    """Make ``torch.save`` write through :class:`_FullDisk` (torch wraps its OSError)."""
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, handle: real(obj, _FullDisk(handle, room)))


def test_a_full_disk_is_an_os_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    # torch reported it as RuntimeError("[enforce fail at inline_container.cc:672] . unexpected
    # pos ..."), which the trainer did not recognise: a two-exception traceback.
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state(1), path)
    full_disk(monkeypatch)
    with pytest.raises(OSError) as raised:
        save_checkpoint({**state(2), "big": torch.zeros(10_000)}, path)
    assert raised.value.errno == errno.ENOSPC
    assert load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_output_dir_lock_names_its_holder_and_dies_with_it(tmp_path: pathlib.Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time; from training.checkpoint import output_dir_lock\n"
            "with output_dir_lock(pathlib.Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with (
            pytest.raises(OutputDirInUseError, match=f"in use by another run \\(pid {holder.pid},"),
            output_dir_lock(tmp_path),
        ):
            pass
        holder.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel drops the lock
        holder.wait(timeout=30)
        with output_dir_lock(tmp_path):
            assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_an_unwritable_output_dir_is_locked_read_only_or_not_at_all(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only(path: str, flags: int, *args: int) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with output_dir_lock(tmp_path):  # no lock file and none can be made: no lock, no error
        assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("123\n")
    with output_dir_lock(tmp_path):  # the existing file, locked through a read-only descriptor
        monkeypatch.setattr(os, "open", real_open)
        with pytest.raises(OutputDirInUseError, match=r"pid 123,"), output_dir_lock(tmp_path):
            pass
        monkeypatch.setattr(os, "open", read_only)
    assert (tmp_path / LOCK_NAME).read_text() == "123\n"  # not rewritten
