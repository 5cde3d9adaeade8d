"""Dynamic batching across requests, with admission control.

Images from concurrent requests are queued in groups keyed by (model, processed height,
processed width): only same-size images of the same model version can share an inference
call. One scheduler task takes the group whose oldest image waited longest, lets it fill for up
to ``max_queue_delay`` (or until ``max_batch_size`` images), and runs it in a dedicated
inference thread so the event loop stays free. While a batch runs, the next one accumulates, so
under load batches form without any added delay (continuous batching).

Up to ``pipeline_depth`` batches are handed to the inference thread at once. With 2 (the
default on the CUDA provider) the next batch waits in the thread's queue and starts the moment
the previous call returns; with 1 (the default on the CPU) the thread idles after each call
until the event loop, busy reading and answering requests, comes back to the scheduler. On a
GPU, where a call takes milliseconds, that idle time can exceed the calls themselves. On the
CPU a call takes long enough for the idle time not to matter, and a batch formed while another
runs would only be smaller than one formed when the thread is free.

The inference thread copies the images of a batch into a float32 buffer that it reuses from
one call to the next (:class:`PixelBuffers`), with plain memory copies that keep Python's GIL.
Numpy's copies (``np.stack``) and arithmetic release the GIL for every large array; in a busy
process each release hands the GIL to another thread, which may keep it for up to the switch
interval (5 ms) before this thread gets it back. Stacking 32 images at 224x224 took 3-5 ms
alone and 125-170 ms beside one busy Python thread; the copies that keep the GIL took 3.3-3.6
and 7.8-8.4 ms (``python -m bench.batch_assembly``). A fresh batch array would also be
zero-filled page by page by the kernel at every call.

A batch is also bounded by attention memory: ``batch * tokens**2 * heads * 4`` bytes (the
float32 attention matrix of one block, see :func:`attention_bytes`) stays within
``max_attention_bytes``; a group whose images are large runs in smaller batches. (An image whose
own cost exceeds the budget is refused by the route before it is queued.)

If an inference call fails, its images are retried one by one, so one poisoned image does not
fail the other clients' images that shared its batch; the failure is logged with a reference
and the client sees only that reference, never the engine's text.

Admission is counted in images from the moment a request's images are accepted (before they
are decoded) until its answer is built; beyond ``capacity`` the request is refused with 429.

A request that ends while its images wait (its client disconnected, or another of its images
failed) withdraws them from the queue, so no batch runs for an answer nobody will read. A running
batch whose every image belongs to such requests is stopped (onnxruntime's terminate flag,
checked between operators); one that still has a live image finishes, and the others' results
are dropped. Either way the ended request keeps its admission until the batch holding its
images has stopped, so capacity and ``dino_images_in_flight`` count the work really running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from models.contract import OUTPUT_NAMES
from service.attention import attention_bytes
from service.errors import InferenceFailedError, NotReadyError, OverloadedError
from service.metrics import Metrics
from service.runtime import CUDA, OnnxModel, RunControl

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Result:
    """One image's outputs and how long its batch ran.

    Attributes:
        outputs: Output name -> array without the batch axis.
        infer_s: Duration of the inference call that produced it, in the inference thread:
            copying the batch together and the onnxruntime call.
        session_s: The onnxruntime call (part of ``infer_s``), until the inference thread
            holds the GIL again; with a float16 model, its input and output casts too.
    """

    outputs: Outputs
    infer_s: float
    session_s: float = 0.0


@dataclass
class _Timing:
    """When the inference thread started a call and how long it ran (set by that thread)."""

    started: float | None = None
    elapsed: float = 0.0
    session: float = 0.0  # the onnxruntime call (and a float16 model's casts)


@dataclass(eq=False)  # identity: items are found and removed by identity, arrays inside
class _Item:
    pixels: np.ndarray  # (3, H, W) float32
    outputs: tuple[str, ...]
    model: OnnxModel
    future: asyncio.Future[Result]
    siblings: list[asyncio.Future[Result]]  # every future of the request, this one included
    enqueued: float = field(default_factory=time.perf_counter)
    running: asyncio.Future[None] | None = None  # done when the batch holding it has stopped


class Batcher:
    """Queue, scheduler and admission control.

    Args:
        max_batch_size: Most images per inference call.
        max_queue_delay_s: Longest an image waits for companions.
        max_attention_bytes: Most attention-matrix bytes per inference call (see
            :func:`attention_bytes`); batches of large images are split to stay within it.
        capacity: Most images admitted at once (429 beyond).
        retry_after_s: ``Retry-After`` sent with a 429.
        metrics: Where to record queue depth, waits, batch sizes and inference time.
        flush_when_idle: Run a group at once, without ``max_queue_delay``, when no image of an
            admitted request is being decoded (see :meth:`preparing`): none could join it.
        pipeline_depth: Batches handed to the inference thread at once (the running one
            included); 1 forms the next batch only after the previous one has returned; 0
            (auto): 2 for a model on the CUDA provider, 1 otherwise.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_attention_bytes: int,
        capacity: int,
        retry_after_s: int,
        metrics: Metrics,
        flush_when_idle: bool = False,
        pipeline_depth: int = 0,
    ) -> None:
        if pipeline_depth < 0:
            raise ValueError(f"pipeline_depth must be 0 (auto) or more, got {pipeline_depth}")
        self._max_batch_size = max_batch_size
        self._delay = max_queue_delay_s
        self._max_attention_bytes = max_attention_bytes
        self._capacity = capacity
        self._retry_after_s = retry_after_s
        self._metrics = metrics
        self._groups: dict[tuple[OnnxModel, int, int], deque[_Item]] = {}
        self._queued = 0
        self._admitted = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._buffers = PixelBuffers()  # used by the inference thread only
        self._running: dict[RunControl, list[_Item]] = {}  # calls handed to the thread
        self._depth = pipeline_depth
        self._batches: dict[asyncio.Task[None], list[_Item]] = {}  # their tasks and images
        self._batch_ended = asyncio.Event()
        self._preparing = 0  # images of admitted requests still being decoded
        self._flush_when_idle = flush_when_idle  # callers then report them with preparing()

    async def start(self) -> None:
        """Start the scheduler task (inside the running loop)."""
        self._task = asyncio.create_task(self._schedule(), name="batcher")

    async def stop(self) -> None:
        """Stop scheduling, stop the inference calls in progress and fail whatever waits."""
        if self._task is not None:  # first, so that no batch is formed after this
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # No await from here to the cancellations: a batch task that has not started yet
        # never starts, and every call handed to the thread is told to stop.
        for control in self._running:
            control.terminate()
        batches = dict(self._batches)
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)
        # Their images (those of a batch being retried one by one included) and the queued ones
        # would otherwise wait forever.
        waiting = [item for items in batches.values() for item in items]
        waiting += [item for group in self._groups.values() for item in group]
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(NotReadyError("the service is shutting down"))
        self._groups.clear()
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        """Hold ``count`` images of capacity for the duration of a request.

        Raises:
            OverloadedError: Admitting them would exceed the capacity.
        """
        if self._admitted + count > self._capacity:
            raise OverloadedError(
                f"the service is at capacity ({self._admitted} of {self._capacity} images in "
                f"flight); retry in {self._retry_after_s} s",
                retry_after_s=self._retry_after_s,
            )
        self._admitted += count
        self._metrics.in_flight.set(self._admitted)
        try:
            yield
        finally:
            self._admitted -= count
            self._metrics.in_flight.set(self._admitted)

    @contextlib.contextmanager
    def preparing(self, count: int) -> Iterator[None]:
        """Mark ``count`` images as being decoded: they may soon join a forming batch."""
        self._preparing += count
        try:
            yield
        finally:
            self._preparing -= count
            if self._preparing == 0:
                self._wake.set()  # a group waiting only for them need not wait longer

    def batch_limit(self, model: OnnxModel, height: int, width: int) -> int:
        """Most images of this size per inference call (at least one)."""
        meta = model.metadata
        cost = attention_bytes(
            width=width, height=height, patch_size=meta.patch_size, num_heads=meta.num_heads
        )
        return max(1, min(self._max_batch_size, self._max_attention_bytes // cost))

    async def submit(
        self, model: OnnxModel, pixels: list[np.ndarray], outputs: tuple[str, ...]
    ) -> list[Result]:
        """Queue images (all of one request) and wait for their outputs.

        Args:
            model: The model snapshot the request started with.
            pixels: ``[3, H, W]`` float32 arrays.
            outputs: Contract output names wanted.

        Returns:
            One :class:`Result` per image, in order.

        Raises:
            InferenceFailedError: Inference failed on one of the images (even alone).
        """
        loop = asyncio.get_running_loop()
        items: list[tuple[tuple[OnnxModel, int, int], _Item]] = []
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in pixels]
        for array, future in zip(pixels, futures, strict=True):
            key = (model, int(array.shape[1]), int(array.shape[2]))
            item = _Item(array, outputs, model, future, futures)
            self._groups.setdefault(key, deque()).append(item)
            items.append((key, item))
        self._queued += len(pixels)
        self._metrics.queue_depth.set(self._queued)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(item.future for _, item in items)))
        except BaseException:  # cancelled (client gone), or one image failed: the rest is moot
            self._withdraw(items)
            for _, item in items:
                item.future.cancel()  # a no-op for those done; running batches drop the rest
            running = {
                item.running
                for _, item in items
                if item.running is not None and not item.running.done()
            }
            if running:  # the capacity is freed once the inference it started has stopped
                await asyncio.wait(running)
            raise

    def _withdraw(self, items: list[tuple[tuple[OnnxModel, int, int], _Item]]) -> None:
        """Take the images of a request that ended early and still wait out of the queue."""
        withdrawn = 0
        for key, item in items:
            group = self._groups.get(key)
            if group is None or item not in group:
                continue  # already taken by the scheduler (its result will be dropped)
            group.remove(item)
            withdrawn += 1
            if not group:
                del self._groups[key]
        if withdrawn:
            self._queued -= withdrawn
            self._metrics.queue_depth.set(self._queued)
            self._metrics.withdrawn.inc(withdrawn)
            self._wake.set()  # the scheduler may be waiting on a group that is now gone

    async def _schedule(self) -> None:
        while True:
            if not self._groups:
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._batches) >= self.pipeline_depth(self._oldest()[0]):
                self._batch_ended.clear()  # while the thread is full, the queue keeps filling
                await self._batch_ended.wait()
                continue
            live = await self._next_batch()
            if live:
                task = asyncio.create_task(self._execute(live))
                self._batches[task] = live
                task.add_done_callback(self._batch_done)

    def pipeline_depth(self, model: OnnxModel) -> int:
        """Batches of ``model`` that may be handed to the inference thread at once."""
        if self._depth:
            return self._depth
        return 2 if model.provider == CUDA else 1

    def _oldest(self) -> tuple[OnnxModel, int, int]:
        """The key of the group whose oldest image has waited longest."""
        return min(self._groups, key=lambda k: self._groups[k][0].enqueued)

    async def _next_batch(self) -> list[_Item]:
        """Take the next batch off the queue (empty when its group was withdrawn meanwhile)."""
        while self._groups:
            key = self._oldest()
            group = self._groups[key]
            limit = self.batch_limit(*key)
            deadline = group[0].enqueued + self._delay
            while 0 < len(group) < limit:
                if self._flush_when_idle and self._preparing == 0:
                    break  # no admitted image is on its way: waiting cannot fill the batch
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
            if self._groups.get(key) is not group:
                continue  # every image of the group was withdrawn while it filled
            taken = [group.popleft() for _ in range(min(len(group), limit))]
            if not group:
                del self._groups[key]
            self._queued -= len(taken)
            self._metrics.queue_depth.set(self._queued)
            live = [item for item in taken if not item.future.done()]
            if len(live) < len(taken):  # their requests ended while they waited
                self._metrics.withdrawn.inc(len(taken) - len(live))
            return live
        return []

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        self._batch_ended.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("a batch task failed", exc_info=task.exception())

    async def _execute(self, items: list[_Item], *, retry: bool = False) -> None:
        """Run ``items`` as one inference call (``retry``: one image of a failed batch)."""
        loop = asyncio.get_running_loop()
        running: asyncio.Future[None] = loop.create_future()
        control = RunControl()

        def stop_if_abandoned(_: asyncio.Future[Result]) -> None:
            if not running.done() and all(item.future.done() for item in items):
                control.terminate()  # every image answered or abandoned: nobody waits for it

        for item in items:
            item.running = running
            item.future.add_done_callback(stop_if_abandoned)
        try:
            await self._run_batch(items, control, running, retry=retry)
        finally:
            if not running.done():
                running.set_result(None)
            for item in items:
                item.future.remove_done_callback(stop_if_abandoned)

    async def _run_batch(
        self,
        items: list[_Item],
        control: RunControl,
        running: asyncio.Future[None],
        *,
        retry: bool,
    ) -> None:
        """Run one inference call; ``running`` is resolved as soon as the call has ended.

        A ``retry`` counts as an inference call (batch size 1) but not as a queue wait: its
        image's wait was observed when the batch that failed took it.
        """
        self._metrics.batch_size.observe(len(items))
        wanted = {name for item in items for name in item.outputs}
        outputs = tuple(name for name in OUTPUT_NAMES if name in wanted)
        model = items[0].model
        loop = asyncio.get_running_loop()
        timing = _Timing()
        self._running[control] = items
        try:
            result = await loop.run_in_executor(
                self._executor,
                _infer,
                model,
                [item.pixels for item in items],
                outputs,
                control,
                timing,
                self._buffers,
            )
        except Exception:
            self._running.pop(control, None)
            if not retry:
                self._observe_wait(items, timing)
            running.set_result(None)  # the call has ended: requests that left need not wait
            if control.terminated and all(item.future.done() for item in items):
                self._metrics.stopped_batches.inc()
                logger.info(
                    "stopped a batch of %d image(s) whose requests had all ended", len(items)
                )
                return
            if len(items) > 1:
                logger.warning(
                    "inference failed on a batch of %d images; retrying them one by one",
                    len(items),
                    exc_info=True,
                )
                for item in items:
                    if not item.future.done():
                        await self._execute([item], retry=True)
                return
            reference = uuid.uuid4().hex[:12]
            logger.exception("inference failed on one image (reference %s)", reference)
            if not items[0].future.done():
                items[0].future.set_exception(
                    InferenceFailedError(
                        f"inference failed on the server (reference {reference}); "
                        "the details are in the service log"
                    )
                )
                for sibling in items[0].siblings:  # the request has failed: no work for the rest
                    sibling.cancel()
            return
        finally:
            self._running.pop(control, None)
        if not retry:
            self._observe_wait(items, timing)
        elapsed = timing.elapsed
        self._metrics.stage_seconds.labels("inference").observe(elapsed)
        self._metrics.stage_seconds.labels("session").observe(timing.session)
        for row, item in enumerate(items):
            if not item.future.done():
                values = {name: result[name][row] for name in item.outputs}
                item.future.set_result(Result(values, elapsed, timing.session))

    def _observe_wait(self, items: list[_Item], timing: _Timing) -> None:
        """Queue wait: from enqueueing to the moment the inference thread took the batch."""
        if timing.started is not None:
            for item in items:
                self._metrics.queue_wait.observe(timing.started - item.enqueued)


class PixelBuffers:
    """float32 batch buffers kept from one inference call to the next, one per image size.

    A buffer grows to the largest batch seen for its size. The least recently used ones are
    dropped once they hold more than ``max_bytes`` together; one larger than that on its own is
    not kept at all. Not thread-safe: only the inference thread uses it.

    Args:
        max_bytes: Most bytes kept between calls.
    """

    def __init__(self, max_bytes: int = 128 << 20) -> None:
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def kept_bytes(self) -> int:
        """Bytes held between calls."""
        return sum(buffer.nbytes for buffer in self._kept.values())

    def get(self, batch: int, height: int, width: int) -> np.ndarray:
        """A C-contiguous ``[batch, 3, height, width]`` float32 array (contents undefined)."""
        key = (height, width)
        buffer = self._kept.pop(key, None)
        if buffer is None or len(buffer) < batch:
            buffer = np.empty((batch, 3, height, width), dtype=np.float32)
        if buffer.nbytes <= self.max_bytes:
            self._kept[key] = buffer  # most recently used last
            while self.kept_bytes > self.max_bytes:
                self._kept.popitem(last=False)
        return buffer[:batch]


def _infer(
    model: OnnxModel,
    pixels: list[np.ndarray],
    outputs: tuple[str, ...],
    control: RunControl,
    timing: _Timing,
    buffers: PixelBuffers,
) -> Outputs:
    timing.started = time.perf_counter()
    if control.terminated:  # abandoned (or the service stopping) before it could start
        raise RuntimeError("the batch was stopped before it ran")
    try:
        _, height, width = pixels[0].shape
        batch = buffers.get(len(pixels), height, width)  # (B, 3, H, W)
        copy_rows(batch, pixels)
        called = time.perf_counter()
        try:
            return model.run(batch, outputs, control)
        finally:
            timing.session = time.perf_counter() - called
    finally:
        timing.elapsed = time.perf_counter() - timing.started


def copy_rows(out: np.ndarray, rows: list[np.ndarray]) -> None:
    """Copy ``rows`` into ``out[0]``, ``out[1]``, ... without releasing the GIL.

    Args:
        out: C-contiguous array of ``len(rows)`` rows.
        rows: Arrays of ``out``'s dtype and row shape.

    Raises:
        ValueError: A row's count, shape or dtype differs from ``out``'s rows.
    """
    if len(rows) != len(out):
        raise ValueError(f"{len(rows)} rows for {len(out)}")
    target = out.data.cast("B")  # raw bytes: slice assignment is a memcpy under the GIL
    size = target.nbytes // max(len(out), 1)
    for index, row in enumerate(rows):
        if row.shape != out.shape[1:] or row.dtype != out.dtype:
            raise ValueError(
                f"row {index} is {row.dtype} {row.shape}, not {out.dtype} {out.shape[1:]}"
            )
        source = np.ascontiguousarray(row).data.cast("B")
        target[index * size : (index + 1) * size] = source
