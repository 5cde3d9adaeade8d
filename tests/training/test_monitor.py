"""The collapse watch, the teacher entropy it reads, and the run logs' rewind on resume."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import pytest
import torch

from training.loss import DINOLoss
from training.monitor import EPOCH_LOG, STEP_LOG, CollapseWatch, RunLog


def test_a_uniform_teacher_is_reported_once_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    watch = CollapseWatch(out_dim=4096)
    log_k = math.log(4096)
    with caplog.at_level(logging.WARNING, logger="training"):
        assert watch.observe(epoch=0, loss=3.0, teacher_entropy=0.5 * log_k) == []
        assert watch.observe(epoch=0, loss=3.0, teacher_entropy=0.99 * log_k) == ["uniform_teacher"]
        assert watch.observe(epoch=0, loss=3.0, teacher_entropy=0.995 * log_k) == [
            "uniform_teacher"
        ]
        assert caplog.text.count("teacher entropy") == 1  # once in epoch 0
        watch.observe(epoch=1, loss=3.0, teacher_entropy=0.99 * log_k)
        assert caplog.text.count("teacher entropy") == 2  # and again in epoch 1


def test_a_loss_stuck_at_log_k_is_reported_after_the_patience(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = CollapseWatch(out_dim=65536, patience=3)
    stuck = math.log(65536) * 1.005  # 11.09: within 1 %
    with caplog.at_level(logging.WARNING, logger="training"):
        assert watch.observe(epoch=0, loss=stuck, teacher_entropy=1.0) == []
        assert watch.observe(epoch=0, loss=stuck, teacher_entropy=1.0) == []
        assert watch.observe(epoch=0, loss=9.0, teacher_entropy=1.0) == []  # moved: count resets
        assert watch.observe(epoch=0, loss=stuck, teacher_entropy=1.0) == []
        assert watch.observe(epoch=0, loss=stuck, teacher_entropy=1.0) == []
        assert watch.observe(epoch=0, loss=stuck, teacher_entropy=1.0) == ["loss_stuck"]
    assert "11.0904" in caplog.text and "collapsed" in caplog.text


def test_teacher_entropy_is_the_mean_entropy_of_the_sharpened_teacher() -> None:
    """Against the formula: softmax((t - centre) / temperature), entropy per row, mean."""
    torch.manual_seed(0)
    loss = DINOLoss(16, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=2, nepochs=5)  # fmt: skip
    loss.center.copy_(torch.randn(1, 16))
    student, teacher = torch.randn(4 * 3, 16), torch.randn(2 * 3, 16)
    centre = loss.center.clone()
    loss(student, teacher, epoch=1)
    q = torch.softmax((teacher - centre) / float(loss.teacher_temp_schedule[1]), dim=-1)
    expected = -(q * q.log()).sum(-1).mean()
    assert float(loss.last_teacher_entropy) == pytest.approx(float(expected), rel=1e-5)
    # A collapsed (constant) teacher is uniform: entropy log K.
    loss(student, torch.zeros(6, 16) + loss.center, epoch=4)
    assert float(loss.last_teacher_entropy) == pytest.approx(math.log(16), rel=1e-5)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rewind_drops_repeated_epochs_by_epoch_not_by_iteration(tmp_path: Path) -> None:
    """A resume with another batch size has other iteration numbers: steps are matched by their
    epoch, so epoch 0's later steps survive and nothing of epoch 1 is kept."""
    log = RunLog(tmp_path, enabled=True)
    for it in range(4):  # epoch 0 with 4 steps per epoch
        log.step(it, {"epoch": 0, "loss": 1.0})
    log.step(4, {"epoch": 1, "loss": 1.0})  # epoch 1 interrupted
    log.epoch(0, {"train_loss": 1.0})
    with open(tmp_path / STEP_LOG, "a") as handle:
        handle.write('{"iteration": 5, "ep')  # a line cut short by the crash
    log.close()

    resumed = RunLog(tmp_path, enabled=True)
    resumed.rewind(1, 1 * 2)  # now 2 steps per epoch: epoch 1 starts at iteration 2
    steps = _lines(tmp_path / STEP_LOG)
    assert [(s["epoch"], s["iteration"]) for s in steps] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [e["epoch"] for e in _lines(tmp_path / EPOCH_LOG)] == [0]
    resumed.rewind(0, 0)  # a fresh start (--resume false) drops everything
    assert _lines(tmp_path / STEP_LOG) == [] and _lines(tmp_path / EPOCH_LOG) == []
    resumed.close()


def test_rewind_sets_damaged_lines_aside_instead_of_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not UTF-8 (or not JSON) in a log must not stop a resume, and are kept
    in a file of their own, as they were."""
    good = [json.dumps({"train_loss": 1.0, "epoch": e}).encode() + b"\n" for e in range(3)]
    (tmp_path / EPOCH_LOG).write_bytes(good[0] + b"\xff\xfe x\n" + good[1] + b"[1]\n\n" + good[2])
    (tmp_path / STEP_LOG).write_bytes(b'{"iteration": 0, "epoch": 0}\n{"iteration": 1, "ep')
    with caplog.at_level(logging.WARNING, logger="training"):
        RunLog(tmp_path, enabled=True)._rewind_json(2, 4)
    assert [e["epoch"] for e in _lines(tmp_path / EPOCH_LOG)] == [0, 1]
    assert (tmp_path / "log.txt.damaged").read_bytes() == b"\xff\xfe x\n[1]\n"
    assert [s["iteration"] for s in _lines(tmp_path / STEP_LOG)] == [0]
    assert (tmp_path / "log_steps.jsonl.damaged").read_bytes() == b'{"iteration": 1, "ep\n'
    assert "moved 2 line(s) that are not JSON records" in caplog.text
    (tmp_path / EPOCH_LOG).write_bytes(b"\x80\n")
    RunLog(tmp_path, enabled=True)._rewind_json(2, 4)  # appended: the earlier ones stay
    assert (tmp_path / "log.txt.damaged").read_bytes() == b"\xff\xfe x\n[1]\n\x80\n"
    assert (tmp_path / EPOCH_LOG).read_bytes() == b""


def test_rewind_of_old_step_records_without_an_epoch_uses_the_iteration(tmp_path: Path) -> None:
    (tmp_path / STEP_LOG).write_text(
        "".join(json.dumps({"iteration": i, "loss": 1.0}) + "\n" for i in range(5))
    )
    RunLog(tmp_path, enabled=True).rewind(1, 3)
    assert [s["iteration"] for s in _lines(tmp_path / STEP_LOG)] == [0, 1, 2]


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    log = RunLog(tmp_path, enabled=False)
    log.step(0, {"epoch": 0, "loss": 1.0})
    log.epoch(0, {"train_loss": 1.0})
    log.rewind(0, 0)
    assert list(tmp_path.iterdir()) == []


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def _next_second() -> None:
    """Event files are named (and read in order) by their creation time in whole seconds; a
    real resume or restart is a later process, so a later second."""
    time.sleep(1.01 - time.time() % 1)


def test_tensorboard_hides_the_steps_a_resume_repeats(tmp_path: Path) -> None:
    log = RunLog(tmp_path, enabled=True)
    assert not (tmp_path / "tensorboard").exists()  # nothing before the run starts
    log.rewind(0, 0)
    for it in range(5):  # interrupted in epoch 1, after iteration 4 (3 steps per epoch)
        log.step(it, {"epoch": it // 3, "loss": 1.0})
    log.epoch(0, {"train_loss": 1.0})
    log.epoch(1, {"train_loss": 1.0})  # written, then lost with the checkpoint (a crash)
    log.close()
    _next_second()
    resumed = RunLog(tmp_path, enabled=True)
    resumed.rewind(1, 3)  # epoch 1 again, from iteration 3
    for it in range(3, 6):
        resumed.step(it, {"epoch": 1, "loss": 2.0})
    resumed.epoch(1, {"train_loss": 2.0})
    resumed.close()
    folder = tmp_path / "tensorboard"
    assert len([p for p in folder.iterdir() if p.is_file()]) == 2
    assert _tensorboard_steps(folder, "step/loss") == list(range(6))
    assert _tensorboard_steps(folder / "epochs", "epoch/train_loss") == [0, 1]
    _next_second()
    fresh = RunLog(tmp_path, enabled=True)
    fresh.rewind(0, 0)  # --resume false: the old run's points are hidden
    fresh.step(0, {"epoch": 0, "loss": 3.0})
    fresh.epoch(0, {"train_loss": 3.0})
    fresh.close()
    assert _tensorboard_steps(folder, "step/loss") == [0]
    assert _tensorboard_steps(folder / "epochs", "epoch/train_loss") == [0]


def test_a_rewritten_log_is_on_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shortened log was renamed over the old one without an fsync: a power loss after the
    rename could leave an empty log.txt."""
    log = RunLog(tmp_path, enabled=True)
    log.epoch(0, {"train_loss": 1.0})
    log.epoch(1, {"train_loss": 1.0})
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(f"replace {Path(src).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    RunLog(tmp_path, enabled=True)._rewind_json(1, 2)
    assert events[:3] == [
        f"fsync .{EPOCH_LOG}.tmp",
        f"replace .{EPOCH_LOG}.tmp",
        f"fsync {tmp_path.name}",
    ]
    assert [e["epoch"] for e in _lines(tmp_path / EPOCH_LOG)] == [0]
