"""The batcher on its own, with a fake model: withdrawal of cancelled requests."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from service.batcher import Batcher
from service.metrics import Metrics


@dataclass(frozen=True)
class _Meta:
    patch_size: int = 8
    num_heads: int = 2


@dataclass(eq=False)
class _FakeModel:
    """Returns each image's pixel sum as its CLS embedding; ``gate`` holds every run."""

    metadata: _Meta = field(default_factory=_Meta)
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    calls: list[int] = field(default_factory=list)

    def run(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self.calls.append(len(batch))
        self.started.set()
        self.gate.wait(10)
        return {"cls_embedding": batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)}


def _images(*values: float) -> list[np.ndarray]:
    return [np.full((3, 16, 16), v, dtype=np.float32) for v in values]


def _batcher(metrics: Metrics, delay_s: float) -> Batcher:
    return Batcher(
        max_batch_size=8,
        max_queue_delay_s=delay_s,
        max_attention_bytes=1 << 30,
        capacity=64,
        retry_after_s=1,
        metrics=metrics,
    )


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancelled_while_queued_is_withdrawn_and_never_run() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        batcher = _batcher(metrics, delay_s=0.3)
        model = _FakeModel()
        model.gate.set()
        await batcher.start()
        try:
            kept = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
            leaving = asyncio.create_task(
                batcher.submit(model, _images(2.0, 3.0), ("cls_embedding",))
            )
            await asyncio.sleep(0.05)
            assert _sample(metrics, "dino_queue_depth") == 3
            await _cancel(leaving)
            assert _sample(metrics, "dino_queue_depth") == 1
            assert _sample(metrics, "dino_withdrawn_images_total") == 2
            (result,) = await kept
            assert result.outputs["cls_embedding"].tolist() == [3 * 16 * 16 * 1.0]
            assert model.calls == [1]
            # A request whose whole group is withdrawn while the scheduler waits on it.
            alone = asyncio.create_task(batcher.submit(model, _images(4.0), ("cls_embedding",)))
            await asyncio.sleep(0.05)
            await _cancel(alone)
            await asyncio.sleep(0.4)  # past that group's deadline
            assert model.calls == [1]
            assert _sample(metrics, "dino_queue_depth") == 0
            (again,) = await batcher.submit(model, _images(5.0), ("cls_embedding",))
            assert again.outputs["cls_embedding"].tolist() == [3 * 16 * 16 * 5.0]
            assert model.calls == [1, 1]
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_while_running_finishes_and_drops_its_results() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        batcher = _batcher(metrics, delay_s=0.05)
        model = _FakeModel()
        await batcher.start()
        try:
            kept = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
            leaving = asyncio.create_task(batcher.submit(model, _images(2.0), ("cls_embedding",)))
            await asyncio.to_thread(model.started.wait, 10)
            await _cancel(leaving)  # its image is in the running batch: nothing to withdraw
            assert _sample(metrics, "dino_withdrawn_images_total") == 0
            model.gate.set()
            (result,) = await kept
            assert result.outputs["cls_embedding"].tolist() == [3 * 16 * 16 * 1.0]
            assert model.calls == [2]
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_a_failed_image_withdraws_the_rest_of_its_request() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        batcher = _batcher(metrics, delay_s=0.3)
        model = _FakeModel()
        model.gate.set()
        await batcher.start()
        try:
            small = np.zeros((3, 8, 8), np.float32)  # two groups, both waiting 0.3 s
            waiting = _images(2.0)[0]
            request = asyncio.create_task(
                batcher.submit(model, [small, waiting], ("cls_embedding",))
            )
            await asyncio.sleep(0.05)
            # Fail the 8x8 image's future as a failed inference would.
            for group in list(batcher._groups.values()):
                for item in group:
                    if item.pixels.shape[1] == 8:
                        item.future.set_exception(RuntimeError("inference failed"))
            with pytest.raises(RuntimeError, match="inference failed"):
                await request
            assert _sample(metrics, "dino_withdrawn_images_total") == 2  # both left the queue
            await asyncio.sleep(0.4)
            assert model.calls == []  # the 16x16 image never ran
            assert _sample(metrics, "dino_queue_depth") == 0
        finally:
            await batcher.stop()

    asyncio.run(scenario())
