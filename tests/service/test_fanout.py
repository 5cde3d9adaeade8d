"""The worker threads that run a request's images: outcomes, parallelism, one wake-up per
call, cancellation and closing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from service.fanout import Fanout, FanoutClosedError
from tests.service.conftest import wait_for


class _RefusedError(Exception):
    pass


@pytest.fixture
def fanout() -> Iterator[Fanout]:
    threads = Fanout(4, name="test-fanout")
    yield threads
    threads.close(wait=True)


def _square_or_refuse(item: int) -> int:
    if item % 3 == 2:
        raise _RefusedError(f"item {item}")
    return item * item


def test_map_gives_each_value_or_exception_in_order(fanout: Fanout) -> None:
    outcomes = asyncio.run(fanout.map(_square_or_refuse, list(range(10))))
    assert len(outcomes) == 10
    for item, outcome in enumerate(outcomes):
        if item % 3 == 2:
            assert isinstance(outcome, _RefusedError) and str(outcome) == f"item {item}"
        else:
            assert outcome == item * item
    assert asyncio.run(fanout.map(_square_or_refuse, [])) == []


def test_the_items_of_one_call_run_in_parallel_on_named_threads(fanout: Fanout) -> None:
    barrier = threading.Barrier(4, timeout=10)  # passes only with all four running at once

    def meet(_: int) -> str:
        barrier.wait()
        return threading.current_thread().name

    names = asyncio.run(fanout.map(meet, [0, 1, 2, 3]))
    assert sorted(names) == [f"test-fanout_{n}" for n in range(4)]  # type: ignore[type-var]


def test_the_event_loop_is_woken_once_per_call_whatever_its_size(fanout: Fanout) -> None:
    async def count_wakeups(items: int) -> int:
        loop = asyncio.get_running_loop()
        calls = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        try:
            outcomes = await fanout.map(_square_or_refuse, list(range(items)))
        finally:
            loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        assert len(outcomes) == items
        return calls

    assert asyncio.run(count_wakeups(1)) == 1
    assert asyncio.run(count_wakeups(32)) == 1


def test_a_cancelled_call_drops_the_items_no_thread_has_started() -> None:
    fanout = Fanout(1, name="one")
    started: list[int] = []
    release = threading.Event()

    def job(item: int) -> int:
        started.append(item)
        release.wait(10)
        return item

    async def scenario() -> None:
        task = asyncio.ensure_future(fanout.map(job, [0, 1, 2, 3]))
        while not started:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await fanout.map(job, [7]) == [7]  # the thread is free again: 1-3 were skipped

    try:
        asyncio.run(scenario())
        assert started == [0, 7]  # the one running when the call was cancelled finished
    finally:
        fanout.close(wait=True)


def test_call_returns_the_value_or_raises_the_exception(fanout: Fanout) -> None:
    assert asyncio.run(fanout.call(lambda: 41 + 1)) == 42
    with pytest.raises(_RefusedError, match="item 5"):
        asyncio.run(fanout.call(lambda: _square_or_refuse(5)))


def test_an_interrupt_inside_a_job_is_the_callers_and_the_thread_goes_on() -> None:
    fanout = Fanout(1, name="one")

    def interrupted() -> int:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(fanout.call(interrupted))
        assert asyncio.run(fanout.call(lambda: 5)) == 5  # the same, only, thread
    finally:
        fanout.close(wait=True)


def test_submit_serves_callers_outside_an_event_loop(fanout: Fanout) -> None:
    assert fanout.submit(lambda: 3 * 3).result(timeout=10) == 9
    with pytest.raises(_RefusedError):
        fanout.submit(lambda: _square_or_refuse(2)).result(timeout=10)


def test_a_submitted_call_cancelled_before_it_starts_never_runs() -> None:
    fanout = Fanout(1, name="one")
    release = threading.Event()
    ran: list[str] = []
    try:
        busy = fanout.submit(lambda: release.wait(10))
        waiting = fanout.submit(lambda: ran.append("waiting"))
        assert waiting.cancel()
        release.set()
        assert busy.result(timeout=10) is True
        assert fanout.submit(lambda: ran.append("after")).result(timeout=10) is None
        assert ran == ["after"]
    finally:
        fanout.close(wait=True)


def test_close_fails_queued_items_lets_running_ones_finish_and_refuses_new_calls() -> None:
    class StoppedError(RuntimeError):
        pass

    fanout = Fanout(1, name="one", closed_error=StoppedError)
    release = threading.Event()
    started = threading.Event()

    def job(item: int) -> int:
        if item == 0:
            started.set()
            release.wait(10)
        return item

    async def scenario() -> list[int | BaseException]:
        task = asyncio.ensure_future(fanout.map(job, [0, 1, 2]))
        await asyncio.to_thread(started.wait, 10)
        fanout.close()
        release.set()
        return await task

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == 0
    assert all(
        isinstance(o, StoppedError) and "one threads have stopped" in str(o) for o in outcomes[1:]
    )
    with pytest.raises(StoppedError):
        asyncio.run(fanout.map(job, [3]))
    with pytest.raises(StoppedError):
        fanout.submit(lambda: 1)
    fanout.close(wait=True)  # a second close is harmless, and waits for nothing
    assert not [t for t in threading.enumerate() if t.name.startswith("one_")]


def test_threads_start_with_the_first_call_and_end_with_close() -> None:
    fanout = Fanout(3, name="lazy-fanout")

    def running() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("lazy-fanout_")]

    assert running() == []
    assert fanout.submit(lambda: 1).result(timeout=10) == 1
    assert sorted(running()) == ["lazy-fanout_0", "lazy-fanout_1", "lazy-fanout_2"]
    fanout.close(wait=True)
    assert running() == []


def test_a_job_that_ends_after_its_event_loop_closed_harms_no_thread() -> None:
    fanout = Fanout(1, name="one")
    release = threading.Event()
    started = threading.Event()
    errors: list[object] = []
    previous = threading.excepthook
    threading.excepthook = errors.append
    try:

        def job(_: int) -> int:
            started.set()
            release.wait(10)
            return 1

        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, _context: None)  # "destroyed but pending"
        task = loop.create_task(fanout.map(job, [0]))
        loop.run_until_complete(asyncio.to_thread(started.wait, 10))
        loop.close()  # the task is abandoned, not cancelled: its thread will find no loop
        release.set()
        served = asyncio.run(asyncio.wait_for(fanout.call(lambda: 2), 10))
        assert served == 2  # the one thread got past the abandoned job, and lives
        assert errors == []
        assert not task.done()
    finally:
        threading.excepthook = previous
        fanout.close(wait=True)


def test_at_least_one_thread_is_required() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Fanout(0, name="none")
    with pytest.raises(FanoutClosedError):  # the default error once closed
        closed = Fanout(1, name="closed")
        closed.close()
        closed.submit(lambda: 1)


class _Payload:
    """Stands for a request's bytes or pixels: a weak reference tells when it is freed."""


class _PayloadError(Exception):
    pass


def test_a_calls_items_values_and_errors_go_with_their_last_reference() -> None:
    """No reference cycle: a request's bytes and pixels must not wait for the cycle collector."""
    items = [_Payload() for _ in range(6)]
    item_refs = [weakref.ref(item) for item in items]
    values: list[weakref.ref[_Payload]] = []
    errors: list[weakref.ref[_PayloadError]] = []

    def tracked_error() -> _PayloadError:  # not a local of the raising frame (that is a cycle)
        error = _PayloadError()
        errors.append(weakref.ref(error))
        return error

    def job(item: _Payload) -> _Payload:
        if len(values) + len(errors) >= 3:
            raise tracked_error()
        value = _Payload()
        values.append(weakref.ref(value))
        return value

    gc.collect()
    gc.disable()
    try:
        with fanout_threads(1) as one:  # one thread: the first three succeed, then errors
            outcomes = asyncio.run(one.map(job, items))
            assert sum(isinstance(o, _PayloadError) for o in outcomes) == 3
            del outcomes, items
            # The thread drops its last reference just after the answer wakes the loop; with the
            # collector off, a cycle would keep them for ever.
            wait_for(lambda: all(ref() is None for ref in item_refs + values + errors), 10)

            def fails() -> None:
                raise tracked_error()

            async def call_and_catch() -> bool:  # not through asyncio.run: its task keeps it
                try:
                    await one.call(fails)
                except _PayloadError:
                    return True
                return False

            assert asyncio.run(call_and_catch())
            wait_for(lambda: errors[-1]() is None, 10)
    finally:
        gc.enable()


@contextlib.contextmanager
def fanout_threads(count: int) -> Iterator[Fanout]:
    threads = Fanout(count, name="scoped")
    try:
        yield threads
    finally:
        threads.close(wait=True)


def test_a_submitted_call_that_has_started_cannot_be_cancelled() -> None:
    release = threading.Event()
    started = threading.Event()

    def job() -> str:
        started.set()
        release.wait(10)
        return "done"

    with fanout_threads(1) as one:
        future = one.submit(job)
        assert started.wait(10)
        assert future.running() and not future.cancel()
        release.set()
        assert future.result(timeout=10) == "done"
