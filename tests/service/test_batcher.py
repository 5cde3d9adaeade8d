"""The batcher on its own, with a fake model: withdrawal of cancelled requests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from service.app import _unless_disconnected
from service.batcher import Batcher, PixelBuffers, copy_rows
from service.errors import ClientDisconnectedError, InferenceFailedError, NotReadyError
from service.metrics import Metrics
from service.runtime import RunControl


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
    provider: str = "CPUExecutionProvider"

    def run(
        self, batch: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
    ) -> dict[str, np.ndarray]:
        self.calls.append(len(batch))
        self.started.set()
        self.gate.wait(10)
        return {"cls_embedding": batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)}


@dataclass(eq=False)
class _StoppableModel(_FakeModel):
    """Runs until ``gate`` opens or its control is terminated, as onnxruntime checks it."""

    stopped: threading.Event = field(default_factory=threading.Event)

    def run(
        self, batch: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
    ) -> dict[str, np.ndarray]:
        self.calls.append(len(batch))
        self.started.set()
        deadline = time.monotonic() + 10  # a test that never stops it fails, not hangs
        while not self.gate.wait(0.01) and time.monotonic() < deadline:
            if control is not None and control.terminated:
                self.stopped.set()
                raise RuntimeError("Exiting due to terminate flag being set to true.")
        return {"cls_embedding": batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)}


def _images(*values: float) -> list[np.ndarray]:
    return [np.full((3, 16, 16), v, dtype=np.float32) for v in values]


def _batcher(metrics: Metrics, delay_s: float, depth: int = 2) -> Batcher:
    return Batcher(
        max_batch_size=8,
        max_queue_delay_s=delay_s,
        max_attention_bytes=1 << 30,
        capacity=64,
        retry_after_s=1,
        metrics=metrics,
        pipeline_depth=depth,
    )


@contextlib.asynccontextmanager
async def _running(delay_s: float, depth: int = 2) -> AsyncIterator[tuple[Batcher, Metrics]]:
    """A started batcher (with its metrics), stopped on exit."""
    metrics = Metrics()
    batcher = _batcher(metrics, delay_s=delay_s, depth=depth)
    await batcher.start()
    try:
        yield batcher, metrics
    finally:
        await batcher.stop()


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancelled_while_queued_is_withdrawn_and_never_run() -> None:
    async def scenario() -> None:
        model = _FakeModel()
        model.gate.set()
        async with _running(delay_s=0.3) as (batcher, metrics):
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

    asyncio.run(scenario())


def test_cancelled_while_running_finishes_and_drops_its_results() -> None:
    async def scenario() -> None:
        model = _FakeModel()
        async with _running(delay_s=0.05) as (batcher, metrics):
            kept = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
            leaving = asyncio.create_task(batcher.submit(model, _images(2.0), ("cls_embedding",)))
            await asyncio.to_thread(model.started.wait, 10)
            leaving.cancel()  # its image is in the running batch: nothing to withdraw
            await asyncio.sleep(0.1)
            # The batch still runs for `kept`: the leaving request holds on (and so does its
            # admission in the route) until the inference holding its image has ended.
            assert not leaving.done()
            assert _sample(metrics, "dino_withdrawn_images_total") == 0
            model.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            (result,) = await kept
            assert result.outputs["cls_embedding"].tolist() == [3 * 16 * 16 * 1.0]
            assert model.calls == [2]
            assert _sample(metrics, "dino_stopped_batches_total") == 0

    asyncio.run(scenario())


def test_a_running_batch_nobody_waits_for_is_stopped() -> None:
    async def scenario() -> None:
        model = _StoppableModel()
        async with _running(delay_s=0.05) as (batcher, metrics):
            first = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
            second = asyncio.create_task(batcher.submit(model, _images(2.0), ("cls_embedding",)))
            await asyncio.to_thread(model.started.wait, 10)
            first.cancel()
            await asyncio.sleep(0.1)
            assert not model.stopped.is_set()  # `second` still waits for the batch
            await _cancel(second)
            # The cancellation returns only once the inference has really stopped.
            assert model.stopped.is_set()
            assert first.cancelled()
            assert _sample(metrics, "dino_stopped_batches_total") == 1
            assert model.calls == [2]
            # The inference thread is free again: the next request runs at once.
            model.gate.set()
            (result,) = await batcher.submit(model, _images(3.0), ("cls_embedding",))
            assert result.outputs["cls_embedding"].tolist() == [3 * 16 * 16 * 3.0]
            assert model.calls == [2, 1]

    asyncio.run(scenario())


@pytest.mark.parametrize("depth", [1, 2])
def test_a_failed_image_withdraws_the_rest_of_its_request(depth: int) -> None:
    # The 8x8 image makes inference fail; its request's 16x16 image is in another group. With
    # one batch at a time it still waits in the queue and is withdrawn, never run. With two,
    # its batch was already handed to the inference thread, which starts it as soon as the
    # failed call returns, usually before the event loop has learnt of the failure: it then
    # runs and its result is dropped, or, if the loop came first, it is stopped unstarted.
    @dataclass(eq=False)
    class _Failing(_FakeModel):
        batcher: Batcher | None = None

        def run(
            self, batch: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
        ) -> dict[str, np.ndarray]:
            if batch.shape[-1] == 8:
                self.calls.append(len(batch))
                # Fail only once the 16x16 image has left the queue's reach: handed to this
                # thread (two slots), or past its group's deadline (one slot; 0.1 s).
                deadline = time.monotonic() + (5.0 if depth == 2 else 0.3)
                while time.monotonic() < deadline:
                    if self.batcher is not None and len(self.batcher._running) == 2:
                        break
                    time.sleep(0.005)
                raise RuntimeError("inference failed")
            return super().run(batch, outputs, control)

    async def scenario() -> None:
        model = _Failing()
        model.gate.set()
        async with _running(delay_s=0.1, depth=depth) as (batcher, metrics):
            model.batcher = batcher
            small = np.zeros((3, 8, 8), np.float32)  # queued first: its group runs first
            with pytest.raises(InferenceFailedError):
                await batcher.submit(model, [small, _images(2.0)[0]], ("cls_embedding",))
            withdrawn = _sample(metrics, "dino_withdrawn_images_total")
            stopped = _sample(metrics, "dino_stopped_batches_total")
            if depth == 1:
                assert model.calls == [1]  # the 16x16 image never ran
                assert (withdrawn, stopped) == (1, 0)
            else:
                ran = len(model.calls) - 1  # the 16x16 batch's call, if it started
                assert withdrawn == 0 and ran + stopped == 1, (model.calls, stopped)
            assert _sample(metrics, "dino_queue_depth") == 0
            model.calls.clear()
            # Another request of both sizes is served as usual.
            results = await batcher.submit(model, _images(1.0, 3.0), ("cls_embedding",))
            assert [r.outputs["cls_embedding"].tolist() for r in results] == [[768.0], [2304.0]]

    asyncio.run(scenario())


class _Receive:
    """An ASGI ``receive`` after the body: blocks until ``leave()`` (or fails, if told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.gone = asyncio.Event()
        self.fail = fail

    async def __call__(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("this server does not report disconnects")
        await self.gone.wait()
        return {"type": "http.disconnect"}


@dataclass
class _Request:
    receive: _Receive


def test_unless_disconnected_answers_cancels_or_waits() -> None:
    async def work(done: asyncio.Event, log: list[str]) -> bytes:
        try:
            await done.wait()
            return b"answer"
        except asyncio.CancelledError:
            log.append("work cancelled")
            raise

    async def scenario() -> None:
        # The answer comes first.
        done, log = asyncio.Event(), []
        done.set()
        assert await _unless_disconnected(_Request(_Receive()), work(done, log), images=1) == (
            b"answer"
        )
        # The client leaves first: the work is cancelled, the route answers 499.
        done, log, receive = asyncio.Event(), [], _Receive()
        route = asyncio.create_task(
            _unless_disconnected(_Request(receive), work(done, log), images=1)
        )
        await asyncio.sleep(0)
        receive.gone.set()
        with pytest.raises(ClientDisconnectedError):
            await route
        assert log == ["work cancelled"]
        # The route itself is cancelled (shutdown): the work too, and no 499.
        done, log = asyncio.Event(), []
        route = asyncio.create_task(
            _unless_disconnected(_Request(_Receive()), work(done, log), images=1)
        )
        await asyncio.sleep(0)
        route.cancel()
        with pytest.raises(asyncio.CancelledError):
            await route
        assert log == ["work cancelled"]
        # A server that cannot report disconnects: the answer is awaited.
        done, log = asyncio.Event(), []
        route = asyncio.create_task(
            _unless_disconnected(_Request(_Receive(fail=True)), work(done, log), images=1)
        )
        await asyncio.sleep(0.01)
        done.set()
        assert await route == b"answer" and log == []

    asyncio.run(scenario())


@dataclass(eq=False)
class _FailsInBatches(_FakeModel):
    """Fails on any batch of two or more; runs single images once ``gate`` opens."""

    single_started: threading.Event = field(default_factory=threading.Event)

    def run(
        self, batch: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
    ) -> dict[str, np.ndarray]:
        if len(batch) > 1:
            self.calls.append(len(batch))
            raise RuntimeError("inference failed")
        self.single_started.set()
        return super().run(batch, outputs, control)


def test_a_request_that_ends_during_one_by_one_retries_does_not_wait_for_them() -> None:
    async def scenario() -> None:
        model = _FailsInBatches()
        async with _running(delay_s=0.1) as (batcher, _):
            tasks = [
                asyncio.create_task(batcher.submit(model, _images(v), ("cls_embedding",)))
                for v in (1.0, 2.0, 3.0)
            ]
            await asyncio.to_thread(model.single_started.wait, 10)  # retry of image 1, held
            # The failed call has ended; the third request's retry has not started: leaving
            # now, it waits for nothing (not for the retries of the others).
            tasks[2].cancel()
            await asyncio.wait({tasks[2]}, timeout=2)
            assert tasks[2].cancelled()
            model.gate.set()
            first, second = [await task for task in tasks[:2]]
            assert first[0].outputs["cls_embedding"].tolist() == [768.0]
            assert second[0].outputs["cls_embedding"].tolist() == [1536.0]
            assert model.calls == [3, 1, 1]  # the batch, then two retries (not the third)

    asyncio.run(scenario())


def test_one_by_one_retries_count_as_calls_but_not_as_queue_waits_again() -> None:
    async def scenario() -> None:
        model = _FailsInBatches()
        model.gate.set()
        async with _running(delay_s=0.1) as (batcher, metrics):
            tasks = [
                asyncio.create_task(batcher.submit(model, _images(v), ("cls_embedding",)))
                for v in (1.0, 2.0, 3.0)
            ]
            answers = [await task for task in tasks]
            assert [a[0].outputs["cls_embedding"].tolist() for a in answers] == [
                [768.0],
                [1536.0],
                [2304.0],
            ]
            assert model.calls == [3, 1, 1, 1]
            # Four inference calls (the batch, then each image alone), six images through them.
            assert _sample(metrics, "dino_batch_size_count") == 4
            assert _sample(metrics, "dino_batch_size_sum") == 6
            # Each image waited in the queue once, until the batch that failed took it.
            assert _sample(metrics, "dino_queue_wait_seconds_count") == 3

    asyncio.run(scenario())


def test_stopping_the_batcher_ends_the_running_call_and_fails_its_requests() -> None:
    async def scenario() -> None:
        model = _StoppableModel()
        batcher = _batcher(Metrics(), delay_s=0.05)
        await batcher.start()
        waiting = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
        await asyncio.to_thread(model.started.wait, 10)
        await asyncio.wait_for(batcher.stop(), 5)
        assert model.stopped.is_set()  # terminated, not run to its end
        with pytest.raises(NotReadyError, match="shutting down"):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


def test_stopping_fails_the_batch_waiting_in_the_inference_thread_too() -> None:
    """With a second batch handed over behind the running one, stop() ends both: the second
    never reaches the model and its request is told the service is shutting down."""

    async def scenario() -> None:
        model = _StoppableModel()
        batcher = _batcher(Metrics(), delay_s=0.0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
        await asyncio.to_thread(model.started.wait, 10)
        second = asyncio.create_task(
            batcher.submit(model, [np.ones((3, 8, 8), np.float32)], ("cls_embedding",))
        )
        for _ in range(400):  # until the second batch is handed to the thread (2 s at most)
            if len(batcher._running) == 2:
                break
            await asyncio.sleep(0.005)
        assert len(batcher._running) == 2
        await asyncio.wait_for(batcher.stop(), 5)
        for task in (first, second):
            with pytest.raises(NotReadyError, match="shutting down"):
                await asyncio.wait_for(task, 5)
        assert model.calls == [1]  # only the first batch reached the model

    asyncio.run(scenario())


def test_stopping_fails_a_batch_whose_task_has_not_started_yet() -> None:
    """A batch task created just before stop() must neither start its call nor leave its
    request waiting (nor keep stop() waiting for a call nobody terminated)."""

    async def scenario() -> None:
        model = _StoppableModel()
        batcher = _batcher(Metrics(), delay_s=0.0)
        await batcher.start()
        waiting = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
        for _ in range(20):  # the request queues its image, the scheduler creates the task
            if batcher._batches:
                break
            await asyncio.sleep(0)
        assert len(batcher._batches) == 1 and not batcher._running  # created, not started
        began = time.monotonic()
        await batcher.stop()  # at once: wait_for would let the batch task start first
        assert time.monotonic() - began < 2  # not the model's 10 s
        with pytest.raises(NotReadyError, match="shutting down"):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


def test_stopping_during_the_one_by_one_retry_fails_every_image_of_the_batch() -> None:
    """After a failed batch its images are retried one at a time; stop() during the first
    retry fails all of them, the ones still waiting for their turn included."""

    @dataclass(eq=False)
    class _FailsInBatches(_StoppableModel):
        def run(
            self, batch: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
        ) -> dict[str, np.ndarray]:
            if len(batch) > 1:
                self.calls.append(len(batch))
                raise RuntimeError("inference failed")
            return super().run(batch, outputs, control)  # blocks until terminated

    async def scenario() -> None:
        model = _FailsInBatches()
        batcher = _batcher(Metrics(), delay_s=0.2)
        await batcher.start()
        requests = [
            asyncio.create_task(batcher.submit(model, _images(v), ("cls_embedding",)))
            for v in (1.0, 2.0, 3.0)
        ]
        await asyncio.to_thread(model.started.wait, 10)  # the first retry runs
        assert model.calls == [3, 1]
        await asyncio.wait_for(batcher.stop(), 5)
        for request in requests:
            with pytest.raises(NotReadyError, match="shutting down"):
                await asyncio.wait_for(request, 5)
        assert model.calls == [3, 1]  # the other two retries never started

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("depth", "provider", "pipelined"),
    [
        (2, "CPUExecutionProvider", True),
        (1, "CUDAExecutionProvider", False),
        (0, "CUDAExecutionProvider", True),  # auto: on the GPU
        (0, "CPUExecutionProvider", False),  # auto: on the CPU
    ],
)
def test_the_next_batch_starts_when_a_call_returns_even_if_the_loop_is_busy(
    depth: int, provider: str, pipelined: bool
) -> None:
    """The scheduler's next batch is handed to the inference thread while the current call
    runs (depth 2), so it starts the moment that call returns, even while the event loop is
    blocked; with depth 1 it waits for the loop to form and hand it over."""

    async def scenario() -> None:
        model = _StampedModel(provider=provider)
        async with _running(delay_s=0.0, depth=depth) as (batcher, _):
            first = asyncio.create_task(batcher.submit(model, _images(1.0), ("cls_embedding",)))
            await asyncio.to_thread(model.started.wait, 10)
            second = asyncio.create_task(
                batcher.submit(model, [np.ones((3, 8, 8), np.float32)], ("cls_embedding",))
            )
            for _ in range(20):  # let the scheduler form the second batch
                await asyncio.sleep(0.005)
            threading.Timer(0.05, model.gate.set).start()
            blocked = time.perf_counter()
            time.sleep(1.5)  # the event loop is busy (as reading bodies keeps it) for 1.5 s
            await asyncio.gather(first, second)
        started_second = model.starts[1] - blocked
        if pipelined:
            assert started_second < 1.0, started_second  # at ~0.05 s, when the first returned
        else:
            assert started_second >= 1.5, started_second  # only once the loop was free

    asyncio.run(scenario())


@dataclass(eq=False)
class _StampedModel(_FakeModel):
    """Records when each call starts; the first call waits for ``gate``."""

    starts: list[float] = field(default_factory=list)

    def run(
        self, batch: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
    ) -> dict[str, np.ndarray]:
        self.starts.append(time.perf_counter())
        return super().run(batch, outputs, control)


def test_a_negative_pipeline_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="pipeline_depth must be 0"):
        _batcher(Metrics(), delay_s=0.0, depth=-1)


def test_with_no_image_on_its_way_a_batch_runs_without_waiting_for_companions() -> None:
    """flush_when_idle: a group waits its queue delay only while an admitted request still
    decodes images (they may join it); with none on its way it runs at once."""

    async def scenario() -> None:
        model = _FakeModel()
        model.gate.set()
        metrics = Metrics()
        batcher = Batcher(
            max_batch_size=8,
            max_queue_delay_s=60.0,  # never reached by this test
            max_attention_bytes=1 << 30,
            capacity=64,
            retry_after_s=1,
            metrics=metrics,
            flush_when_idle=True,
        )
        await batcher.start()
        try:
            # Alone: runs at once.
            (result,) = await asyncio.wait_for(
                batcher.submit(model, _images(1.0), ("cls_embedding",)), 5
            )
            assert result.outputs["cls_embedding"].tolist() == [16 * 16 * 3 * 1.0]
            assert model.calls == [1]
            # While two images of another request decode, the queued one waits for them ...
            with batcher.preparing(2):
                first = asyncio.create_task(batcher.submit(model, _images(2.0), ("cls_embedding",)))
                await asyncio.sleep(0.2)
                assert not first.done() and _sample(metrics, "dino_queue_depth") == 1
                second = asyncio.create_task(
                    batcher.submit(model, _images(3.0, 4.0), ("cls_embedding",))
                )
                await asyncio.sleep(0)  # submitted (as a request does right after decoding)
            # ... and all three run together once none is on its way.
            await asyncio.wait_for(asyncio.gather(first, second), 5)
            assert model.calls == [1, 3]
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_pixel_buffers_are_reused_grown_and_bounded() -> None:
    one = 3 * 16 * 16 * 4  # bytes of one 16x16 image in float32
    buffers = PixelBuffers(max_bytes=10 * one)
    first = buffers.get(4, 16, 16)
    assert first.shape == (4, 3, 16, 16) and first.dtype == np.float32
    assert first.flags.c_contiguous
    smaller = buffers.get(2, 16, 16)  # the same memory, its first rows
    assert smaller.shape == (2, 3, 16, 16) and np.shares_memory(smaller, first)
    grown = buffers.get(6, 16, 16)  # larger than kept: a new one replaces it
    assert not np.shares_memory(grown, first) and buffers.kept_bytes == 6 * one
    other = buffers.get(1, 8, 16)  # another size is kept beside it
    assert buffers.kept_bytes == 6 * one + one // 2
    assert np.shares_memory(buffers.get(1, 8, 16), other)
    buffers.get(8, 16, 8)  # over the bound together: the least recently used (16x16) goes
    assert buffers.kept_bytes == one // 2 + 4 * one
    assert not np.shares_memory(buffers.get(1, 16, 16), grown)
    huge = buffers.get(11, 16, 16)  # over the bound on its own: used once, never kept
    assert huge.shape == (11, 3, 16, 16) and not np.shares_memory(buffers.get(11, 16, 16), huge)
    assert buffers.kept_bytes <= 10 * one


def test_rows_are_copied_whole_and_checked() -> None:
    rows = [np.arange(60, dtype=np.float32).reshape(3, 4, 5) * v for v in (1.5, -2.0, 7.25)]
    out = np.full((3, 3, 4, 5), np.nan, dtype=np.float32)  # a reused buffer: stale values
    copy_rows(out, rows)
    np.testing.assert_array_equal(out, np.stack(rows))
    with pytest.raises(ValueError, match="2 rows for 3"):
        copy_rows(out, rows[:2])
    with pytest.raises(ValueError, match="row 1 is float64"):
        copy_rows(out, [rows[0], rows[1].astype(np.float64), rows[2]])
    with pytest.raises(ValueError, match=r"row 2 is float32 \(3, 5, 4\)"):
        copy_rows(out, [rows[0], rows[1], np.zeros((3, 5, 4), np.float32)])
    transposed = np.asfortranarray(rows[1])  # not C-contiguous: copied in order all the same
    copy_rows(out, [rows[0], transposed, rows[2]])
    np.testing.assert_array_equal(out, np.stack(rows))
