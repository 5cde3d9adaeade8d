"""Checkpoint files: atomic, crash-consistent digests, restored copies, corruption, file mode."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from models.checkpoint import file_sha256
from training import checkpoint as ckpt_module
from training.checkpoint import (
    CheckpointCorruptError,
    digest_path,
    load_checkpoint,
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
    # mkstemp creates 0600 files; checkpoints get the usual mode, like any other output file.
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
