"""Training observability: JSON-lines logs, TensorBoard scalars and the collapse watch."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from models.files import fsync_folder

logger = logging.getLogger("training")

EPOCH_LOG = "log.txt"
STEP_LOG = "log_steps.jsonl"
DAMAGED_SUFFIX = ".damaged"  # lines of a log that are not JSON records, set aside on a rewind


class CollapseWatch:
    """Warns when DINO collapses to the uniform output.

    A collapsed teacher outputs (nearly) the same uniform distribution for every image: its
    entropy approaches ``log(out_dim)`` and the loss sticks at that value (11.09 for 65536).
    Each warning is issued at most once per epoch.

    Args:
        out_dim: Head output dimension K.
        entropy_ratio: Warn when the teacher entropy exceeds this fraction of ``log K``.
        loss_tolerance: Relative distance of the loss to ``log K`` that counts as stuck.
        patience: Consecutive stuck observations before warning about the loss.
    """

    def __init__(
        self,
        out_dim: int,
        entropy_ratio: float = 0.98,
        loss_tolerance: float = 0.01,
        patience: int = 3,
    ) -> None:
        self.log_k = math.log(out_dim)
        self.entropy_ratio = entropy_ratio
        self.loss_tolerance = loss_tolerance
        self.patience = patience
        self.stuck = 0
        self.warned_epoch: dict[str, int] = {}

    def _warn_once(self, kind: str, epoch: int, message: str) -> None:
        if self.warned_epoch.get(kind) != epoch:
            self.warned_epoch[kind] = epoch
            logger.warning(message)

    def observe(self, *, epoch: int, loss: float, teacher_entropy: float) -> list[str]:
        """Record one observation; returns the kinds of collapse detected (possibly empty)."""
        found = []
        if teacher_entropy > self.entropy_ratio * self.log_k:
            found.append("uniform_teacher")
            self._warn_once(
                "uniform_teacher",
                epoch,
                f"collapse watch: teacher entropy {teacher_entropy:.3f} is near log(out_dim) = "
                f"{self.log_k:.3f} (uniform outputs). Consider a lower --momentum_teacher, a "
                "smaller --out_dim, a lower --teacher_temp or a longer --freeze_last_layer.",
            )
        if abs(loss - self.log_k) <= self.loss_tolerance * self.log_k:
            self.stuck += 1
        else:
            self.stuck = 0
        if self.stuck >= self.patience:
            found.append("loss_stuck")
            self._warn_once(
                "loss_stuck",
                epoch,
                f"collapse watch: the loss has stayed at {loss:.4f} ~ log(out_dim) = "
                f"{self.log_k:.4f} for {self.stuck} log intervals; training has likely collapsed.",
            )
        return found


class RunLog:
    """Append-only JSON-lines logs (per epoch as the reference's ``log.txt``, per step) and
    TensorBoard scalars when ``tensorboard`` is installed. Only the main rank writes.

    Nothing is written, and no TensorBoard folder created, before :meth:`rewind` starts the
    run's logging (a finished run, or one refused at start, leaves the folder as it was).

    Args:
        output_dir: Run folder.
        enabled: False on ranks other than 0.
    """

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.writer: Any = None  # step scalars
        self.epoch_writer: Any = None  # epoch scalars

    def rewind(self, epoch: int, iteration: int) -> None:
        """Start logging at epoch ``epoch`` (iteration ``iteration``): drop the records of
        epochs ``>= epoch`` (steps without an epoch: ``>= iteration``) and open TensorBoard.

        Called when a run starts: a resumed run repeats the epoch it was interrupted in, and a
        fresh start (``--resume false``) repeats everything, so their old records would
        otherwise appear twice. Steps are matched by their epoch, not their iteration number,
        which depends on the steps per epoch (a resume with another batch size or world size).
        A line that is not a JSON record (cut short by a crash, or damaged: bytes that are not
        UTF-8) leaves the log too, appended as it was to ``log.txt.damaged`` (or
        ``log_steps.jsonl.damaged``) with a warning.

        TensorBoard: step scalars go to ``tensorboard/`` with ``purge_step=iteration`` and epoch
        scalars (whose step is the epoch) to ``tensorboard/epochs/`` with ``purge_step=epoch``,
        so it hides the earlier event files' points from there on (all of them on a fresh
        start). Iterations are counted in this run's steps per epoch: after a resume with
        another batch size or world size the step curves' old and new points do not line up
        (the JSON logs, matched by epoch, stay exact).
        """
        if not self.enabled:
            return
        self._rewind_json(epoch, iteration)
        self.close()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: no TensorBoard scalars")
        else:
            folder = self.output_dir / "tensorboard"
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=iteration)
            self.epoch_writer = SummaryWriter(log_dir=str(folder / "epochs"), purge_step=epoch)

    def _rewind_json(self, epoch: int, iteration: int) -> None:
        for name in (EPOCH_LOG, STEP_LOG):
            path = self.output_dir / name
            if not path.is_file():
                continue
            lines = path.read_bytes().splitlines()
            kept, damaged = [], []
            for line in lines:
                try:
                    record = json.loads(line.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError included
                    if line.strip():
                        damaged.append(line)
                    continue
                if not isinstance(record, dict):
                    damaged.append(line)
                    continue
                key, first = ("epoch", epoch) if "epoch" in record else ("iteration", iteration)
                value = record.get(key)
                if isinstance(value, int) and value < first:
                    kept.append(line + b"\n")
            if damaged:  # kept elsewhere before they leave the log: nothing is lost
                aside = path.with_name(name + DAMAGED_SUFFIX)
                with open(aside, "ab") as handle:
                    handle.write(b"".join(line + b"\n" for line in damaged))
                    handle.flush()
                    os.fsync(handle.fileno())
                logger.warning(
                    "%s: moved %d line(s) that are not JSON records (cut short by a crash, or "
                    "damaged) to %s",
                    path,
                    len(damaged),
                    aside.name,
                )
            if len(kept) != len(lines):  # on disk before the rename: a power loss after it
                tmp = path.with_name(f".{name}.tmp")  # must not leave an empty log
                with open(tmp, "wb") as handle:
                    handle.write(b"".join(kept))
                    handle.flush()
                    os.fsync(handle.fileno())
                tmp.replace(path)
                fsync_folder(path.parent)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.output_dir / name, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def step(self, iteration: int, record: dict[str, Any]) -> None:
        """Log the metrics of one logged step."""
        if not self.enabled:
            return
        self._append(STEP_LOG, {"iteration": iteration, **record})
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"step/{key}", value, iteration)

    def epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Log the end-of-epoch averages (``train_loss``, ``train_lr``, ... and ``epoch``)."""
        if not self.enabled:
            return
        self._append(EPOCH_LOG, {**record, "epoch": epoch})
        if self.epoch_writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float):
                    self.epoch_writer.add_scalar(f"epoch/{key}", value, epoch)
            self.epoch_writer.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        for writer in (self.writer, self.epoch_writer):
            if writer is not None:
                writer.close()
        self.writer = self.epoch_writer = None
