"""Worker threads that run one function over all the images of a request.

``loop.run_in_executor`` costs, for every call, a concurrent future (with its condition
variable), an asyncio future chained to it, and a wake-up of the event loop from the worker
thread. With 8 images a request, that bookkeeping was about a fifth of the time the service's
main process held the GIL (``py-spy record --gil`` under ``bench.serve_throughput``), and one
process's images/s on a fast accelerator is bounded by how long it holds the GIL per image.

A :class:`Fanout` takes a request's images onto its queue in one call, runs them in parallel
in its threads, and tells the event loop once, when the last one is done. A request that is
cancelled (its client left) drops its images that no thread has started; those already running
finish and are discarded, as with an executor's futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class FanoutClosedError(RuntimeError):
    """The threads were stopped before the item ran."""


class _Group(Generic[T, R]):
    """The items of one call and their outcomes; the thread that finishes the last item calls
    ``on_done``."""

    __slots__ = ("fn", "items", "values", "errors", "remaining", "lock", "cancelled", "on_done")

    def __init__(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        on_done: Callable[[_Group[T, R]], object],
    ) -> None:
        self.fn = fn
        self.items: Sequence[T] = items
        self.values: list[R | None] = [None] * len(items)
        self.errors: dict[int, BaseException] = {}
        self.remaining = len(items)
        self.lock = threading.Lock()
        self.cancelled = False  # set by the caller: items not started yet are skipped
        self.on_done: Callable[[_Group[T, R]], object] | None = on_done

    def finish(self, index: int, value: R | None, error: BaseException | None) -> None:
        """Record item ``index``'s outcome (``error`` None: ``value``)."""
        if error is None:
            self.values[index] = value
        else:
            self.errors[index] = error
        self._count_down()

    def skip(self) -> None:
        """Count one item as done without running it (the call was cancelled)."""
        self._count_down()

    def outcomes(self) -> list[R | BaseException]:
        """Each item's value or exception, in order (once every item is done)."""
        return [self.errors.get(i, value) for i, value in enumerate(self.values)]  # type: ignore[misc]

    def _count_down(self) -> None:
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            # on_done leads back here (through the caller's future, whose result is this
            # group): dropped, so that the request's bytes and pixels go with the last
            # reference rather than with the next collection of reference cycles
            on_done, self.on_done = self.on_done, None
            self.items = ()
            if on_done is not None and not self.cancelled:
                on_done(self)


def _outcome(fn: Callable[[T], R], item: T) -> tuple[R | None, BaseException | None]:
    """``fn(item)``'s value, or the exception it raised (the caller's to raise)."""
    try:
        return fn(item), None
    except BaseException as err:
        return None, err


class Fanout:
    """``threads`` worker threads fed from one queue (started with the first call).

    Args:
        threads: Worker threads.
        name: Prefix of the threads' names (``name_0``, ``name_1``, ...).
        closed_error: The exception an item gets when :meth:`close` drops it, or when it is
            submitted after :meth:`close`.
    """

    def __init__(
        self,
        threads: int,
        *,
        name: str,
        closed_error: Callable[[str], Exception] = FanoutClosedError,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.size = threads
        self._name = name
        self._closed_error = closed_error
        self._jobs: queue.SimpleQueue[tuple[_Group[object, object], int] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    async def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | BaseException]:
        """Run ``fn`` on every item in the threads; the event loop is woken once, at the end.

        Args:
            fn: Called once per item, in a worker thread.
            items: The arguments.

        Returns:
            Each call's return value, or the exception it raised, in the order of ``items``
            (an item dropped by :meth:`close` gets ``closed_error``).

        Raises:
            Exception: ``closed_error``, when the threads have been stopped.
        """
        if not items:
            return []
        group = await self._wait(fn, items)
        return group.outcomes()

    async def call(self, fn: Callable[[], R]) -> R:
        """Run ``fn()`` in a worker thread and return its value (or raise its exception)."""
        group = await self._wait(lambda _: fn(), (None,))
        error, value = group.errors.get(0), group.values[0]
        del group
        if error is None:
            return value  # type: ignore[return-value]
        try:
            raise error
        finally:  # the traceback keeps this frame: without its error and group, no cycle
            del error

    def submit(self, fn: Callable[[], R]) -> concurrent.futures.Future[R]:
        """Run ``fn()`` in a worker thread, for callers outside an event loop.

        As with an executor, the future can be cancelled until a thread starts the call.
        """
        future: concurrent.futures.Future[R] = concurrent.futures.Future()

        def start(_: None) -> R | None:
            if not future.set_running_or_notify_cancel():
                return None  # cancelled while it waited: not run
            return fn()

        def settle(group: _Group[None, R | None]) -> None:
            if future.cancelled():
                return
            error = group.errors.get(0)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(group.values[0])  # type: ignore[arg-type]

        self._start(start, (None,), settle)
        return future

    def close(self, *, wait: bool = False) -> None:
        """Stop the threads: items no thread has taken get ``closed_error``; running ones end.

        Args:
            wait: Also wait for the threads to finish what they are running.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        error = f"the {self._name} threads have stopped"
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                group, index = job
                group.finish(index, None, self._closed_error(error))
        for _ in threads:
            self._jobs.put(None)
        if wait:
            for thread in threads:
                thread.join()

    async def _wait(self, fn: Callable[[T], R], items: Sequence[T]) -> _Group[T, R]:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[_Group[T, R]] = loop.create_future()

        def resolve(group: _Group[T, R]) -> None:
            if not finished.done():
                finished.set_result(group)

        def wake(group: _Group[T, R]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(resolve, group)

        group = self._start(fn, items, wake)
        try:
            return await finished
        except BaseException:  # cancelled: the items no thread has taken are dropped
            group.cancelled = True
            raise

    def _start(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        on_done: Callable[[_Group[T, R]], object],
    ) -> _Group[T, R]:
        group = _Group(fn, items, on_done)
        with self._lock:  # close() then finds every item queued before it
            if self._closed:
                raise self._closed_error(f"the {self._name} threads have stopped")
            if not self._threads:
                for number in range(self.size):
                    thread = threading.Thread(
                        target=self._work, name=f"{self._name}_{number}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            for index in range(len(items)):
                self._jobs.put((group, index))  # type: ignore[arg-type]
        return group

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            group, index = job
            del job
            if group.cancelled:
                group.skip()
            else:
                # Called from this frame, which drops the group below: an exception's traceback
                # keeps the frames it passed through (and their callers), so a frame that still
                # held the group would tie the group to the exception it stores.
                value, error = _outcome(group.fn, group.items[index])
                group.finish(index, value, error)
                del value, error
            del group  # no reference to the last request while idle
