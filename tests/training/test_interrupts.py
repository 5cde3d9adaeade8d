"""Signals and the loader's workers: a signal to the process group never hangs the trainer."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

from training import interrupts
from training.interrupts import (
    ELSEWHERE,
    SIGTERM_SEEN,
    Interruption,
    Terminated,
    ignore_interrupts_in_worker,
    interruptions_deferred,
    kill_workers_now,
    mark_stopping,
    pending_interruption,
    raise_if_interrupted,
    raise_interruption,
    sigterm_unwinds,
    start_workers,
    stop_deadline,
    stop_workers,
)

ROOT = Path(__file__).resolve().parents[2]

# A hang here (a lock left held by a killed process) fails in minutes, not in the global 600 s.
pytestmark = pytest.mark.timeout(120)


def _spin_on_event(done: Any, ready: Any) -> None:
    ignore_interrupts_in_worker()
    ready.set()
    while True:  # as a loader worker checks the loader's "done" event between batches
        done.is_set()


def _worker_init(_worker_id: int) -> None:
    ignore_interrupts_in_worker()


def _loader(num_workers: int = 2, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(
        list(range(16)),
        batch_size=2,
        num_workers=num_workers,
        worker_init_fn=_worker_init,
        **kwargs,
    )


def test_a_signalled_worker_never_leaves_the_done_event_locked():
    """The hang behind a flaky CI run: a worker that ended on the process group's SIGTERM
    (os._exit in its handler) could die inside the event's lock, and the trainer's
    shutdown of the loader (which sets that event) then waited forever."""
    context = multiprocessing.get_context("fork")  # as the loader's workers on Linux
    for _ in range(10):
        done, ready = context.Event(), context.Event()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            worker = context.Process(target=_spin_on_event, args=(done, ready), daemon=True)
            worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            assert ready.wait(30)
            time.sleep(0.02)
            for sent in (signal.SIGTERM, signal.SIGINT):
                os.kill(worker.pid, sent)  # type: ignore[arg-type]
            worker.join(0.2)
            assert worker.is_alive()  # ignored: the trainer stops its workers itself
            setter = threading.Thread(target=done.set, daemon=True)
            setter.start()
            setter.join(10)
            assert not setter.is_alive(), "the event's lock was left held"
        finally:
            worker.kill()
            worker.join(10)


class _Firing(multiprocessing.context.ForkContext):
    """A multiprocessing context that sends ``signum`` to this process while the loader
    iterator is being built (after its first worker started), through another thread, as a
    signal to the process group reaches a thread of the trainer that does not block it."""

    def __init__(self, signum: int) -> None:
        self._context = multiprocessing.get_context("fork")
        self.signum = signum
        self.started: list[Any] = []
        self._go = threading.Event()
        self._fired = threading.Event()
        self._thread = threading.Thread(target=self._fire, daemon=True)
        self._thread.start()  # before the signals are blocked in the main thread

    def _fire(self) -> None:
        if not self._go.wait(60):
            return  # the test failed before its second worker: no signal for a later test
        signal.pthread_kill(threading.get_ident(), self.signum)
        self._fired.set()

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 (multiprocessing's name)
        process = self._context.Process(*args, **kwargs)
        self.started.append(process)
        if len(self.started) == 2:
            self._go.set()
            assert self._fired.wait(30)
        return process


@pytest.mark.parametrize(
    ("signum", "raised"), [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)]
)
def test_a_signal_while_the_workers_start_is_raised_once_the_loader_is_whole(
    signum, raised, monkeypatch
):
    """Raised in the middle of torch's iterator set-up, it left started workers that nothing
    stopped (torch's clean-up of the half-built iterator failed with an AttributeError)."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    context = _Firing(signum)
    loader = _loader(multiprocessing_context=context)
    with sigterm_unwinds(), pytest.raises(raised):
        start_workers(loader)
    assert len(context.started) == 2  # the set-up was not cut short
    for worker in context.started:
        worker.join(10)
        assert not worker.is_alive()
    import gc

    gc.collect()
    assert unraisable == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()
    assert not SIGTERM_SEEN.is_set()  # cleared once the handler is removed


def test_starting_workers_restores_the_signal_state_even_when_it_fails():
    class Broken:
        def __iter__(self) -> Any:
            raise OSError(24, "Too many open files")

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with pytest.raises(OSError):
        start_workers(Broken())
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
    assert signal.SIGTERM not in before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _stuck(_index: int) -> int:
    time.sleep(600)
    return 0


def test_stopping_kills_a_worker_that_outlives_torchs_shutdown(monkeypatch):
    """torch's own last resort is a SIGTERM, which the workers ignore."""
    from torch.utils.data import _utils

    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    loader = DataLoader(
        [0, 1], batch_size=1, num_workers=1, collate_fn=_stuck, worker_init_fn=_worker_init
    )
    batches = start_workers(loader)
    (worker,) = batches._workers  # type: ignore[attr-defined]
    time.sleep(0.5)  # the worker is inside _stuck now
    start = time.monotonic()
    stop_workers(batches)
    assert not worker.is_alive()
    assert time.monotonic() - start < 20


def test_a_full_epoch_leaves_no_worker_behind():
    batches = start_workers(_loader())
    workers = list(batches._workers)  # type: ignore[attr-defined]
    assert [int(b.sum()) for b in batches] == [1, 5, 9, 13, 17, 21, 25, 29]
    stop_workers(batches)
    assert not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("slow_kill", [False, True])
def test_workers_still_alive_at_exit_do_not_hang_the_interpreter(tmp_path, slow_kill):
    """multiprocessing's exit hook sends daemon children a SIGTERM (which loader workers
    ignore) and waits for them; the reaper kills them first. slow_kill: the main thread loses
    the CPU after each kill, so torch's SIGCHLD handler (which still watches these workers)
    fires inside the reaper; its error cut the reaper short, and the exit then hung."""
    script = tmp_path / "leave_workers.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import time
            from multiprocessing.process import BaseProcess
            from torch.utils.data import DataLoader
            from training.interrupts import ignore_interrupts_in_worker, start_workers

            if sys.argv[1] == "slow":
                kill = BaseProcess.kill

                def slow_kill(self):
                    kill(self)
                    time.sleep(0.05)

                BaseProcess.kill = slow_kill

            def init(_worker_id):
                ignore_interrupts_in_worker()

            loader = DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=init)
            batches = start_workers(loader)
            next(batches)
            print(",".join(str(w.pid) for w in batches._workers), flush=True)
            sys.exit(0)  # with the iterator (and its workers) alive
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script), "slow" if slow_kill else "plain"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's code, not an install's
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, (
        result.stderr[-2000:]
    )
    for pid in result.stdout.strip().split(","):  # gone (the reaper waited for them)
        assert not Path(f"/proc/{pid}").exists(), pid


def test_the_reaper_kills_only_live_workers():
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_spin_on_event, args=(context.Event(), ready), daemon=True)
    worker.start()
    assert ready.wait(30)
    interrupts._WORKERS.add(worker)
    os.kill(worker.pid, signal.SIGTERM)  # type: ignore[arg-type]
    worker.join(0.2)
    assert worker.is_alive()
    interrupts._reap()
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
    interrupts._reap()  # again: nothing alive, nothing to do


def test_a_worker_ignores_the_signals_from_then_on():
    """Checked in a forked child: signal dispositions are per process."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def report() -> None:
        ignore_interrupts_in_worker()
        queue.put(
            (
                signal.getsignal(signal.SIGTERM) is signal.SIG_IGN,
                signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                signal.pthread_sigmask(signal.SIG_BLOCK, set()),
            )
        )

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        child = context.Process(target=report, daemon=True)
        child.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        assert queue.get(timeout=30) == (True, True, set())
        child.join(10)
        assert child.exitcode == 0
    finally:
        child.kill()  # never left behind for pytest's exit to wait on


def test_deferred_signals_are_raised_on_leaving_the_block():
    with sigterm_unwinds():
        with pytest.raises(Terminated), interruptions_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            reached = True  # not raised inside
        assert reached
        with interruptions_deferred(check=False):  # already seen: raised only when checked
            pass
        with pytest.raises(Terminated):
            raise_if_interrupted()
    assert not SIGTERM_SEEN.is_set()
    with pytest.raises(KeyboardInterrupt), interruptions_deferred():
        with interruptions_deferred(check=False):  # nested: the outer block decides
            os.kill(os.getpid(), signal.SIGINT)
        reached_ctrl_c = True
    assert reached_ctrl_c
    with pytest.raises(KeyboardInterrupt), interruptions_deferred(check=False):
        with interruptions_deferred():  # a nested block that checks raises on leaving
            os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("not raised")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_interrupts_at_once():
    """For a run stuck before its next safe point."""
    with pytest.raises(KeyboardInterrupt), interruptions_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("not interrupted")
    with interruptions_deferred(check=False):
        os.kill(os.getpid(), signal.SIGINT)
    raise_if_interrupted()  # nothing left over: a deferred Ctrl-C is raised once or dropped


def test_sigterm_outside_a_deferred_block_is_raised_at_once():
    with sigterm_unwinds(), pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("not raised")


def test_in_a_torchrun_job_repeated_signals_are_only_recorded():
    """torchrun's agent forwards the signal it got, so a rank Slurm also signals receives it
    twice: the repeat neither kills it (SIGTERM) nor raises (Ctrl-C) before the safe point."""
    with sigterm_unwinds(repeats_stop=False):
        with pytest.raises(Terminated), interruptions_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # with repeats_stop this would kill pytest
            assert signal.getsignal(signal.SIGTERM) is interrupts._terminate
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            reached = True
        assert reached
        assert pending_interruption() is Interruption.SIGTERM
        # Outside a deferred block a repeat is not raised either: it would cut short the
        # unwinding of the first (the run's one line that says why it stopped).
        os.kill(os.getpid(), signal.SIGTERM)
    assert interrupts._repeats_stop  # put back for the next run in this process
    assert not SIGTERM_SEEN.is_set()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_pending_interruption_and_the_agreed_one_raised():
    assert pending_interruption() is Interruption.NONE
    raise_interruption(Interruption.NONE)  # nothing to raise
    with interruptions_deferred(check=False):
        os.kill(os.getpid(), signal.SIGINT)
        assert pending_interruption() is Interruption.CTRL_C
        with pytest.raises(KeyboardInterrupt) as own:
            raise_interruption(Interruption.CTRL_C)
        assert own.value.args == ()  # this process's own Ctrl-C, now raised: not pending
        assert pending_interruption() is Interruption.NONE
        with pytest.raises(KeyboardInterrupt) as other:
            raise_interruption(Interruption.CTRL_C)  # only another process got one
        assert other.value.args == (ELSEWHERE,)
    with sigterm_unwinds(), interruptions_deferred(check=False):
        with pytest.raises(Terminated) as elsewhere:
            raise_interruption(Interruption.SIGTERM)
        assert elsewhere.value.args == (ELSEWHERE,)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # both: SIGTERM is what is acted on
        assert pending_interruption() is Interruption.SIGTERM
        assert max(Interruption.CTRL_C, Interruption.SIGTERM) is Interruption.SIGTERM
        with pytest.raises(Terminated) as here:
            raise_interruption(Interruption.SIGTERM)
        assert here.value.args == ()


def test_starting_workers_unchecked_leaves_a_signal_to_the_caller():
    """In a distributed run the ranks act on a signal where they agree to; starting an
    epoch's workers must not raise it on one rank alone."""
    loader = _loader()
    with sigterm_unwinds(), interruptions_deferred(check=False):
        os.kill(os.getpid(), signal.SIGTERM)
        batches = start_workers(loader, check=False)
        try:
            assert next(iter(batches)).tolist() == [0, 1]
            assert pending_interruption() is Interruption.SIGTERM
        finally:
            stop_workers(batches)


def test_a_rank_that_is_done_ignores_the_signals_while_it_exits():
    """torchrun's agent signals the ranks still running once one has exited; a rank tearing
    torch down after its last line must keep its exit status (not -15)."""
    try:
        with sigterm_unwinds(repeats_stop=False, then_ignored=True):
            assert signal.getsignal(signal.SIGTERM) is interrupts._terminate
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # with SIG_DFL, this would end pytest
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_the_stop_deadline_sees_a_signal_the_main_thread_has_not_handled():
    """The watcher reads the wakeup fd, written by the C-level handler: it needs nothing from
    the main thread, which may be blocked in a collective."""
    expired: list[int] = []
    with sigterm_unwinds(repeats_stop=False), interruptions_deferred(check=False):
        with stop_deadline(0.3, expired.append):
            os.kill(os.getpid(), signal.SIGTERM)
            started = time.monotonic()
            while not expired and time.monotonic() - started < 10:
                time.sleep(0.01)
        assert expired == [signal.SIGTERM]
        assert 0.25 < time.monotonic() - started < 5
        with stop_deadline(0.3, expired.append):  # left in time: nothing expires
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        assert expired == [signal.SIGTERM]
    assert signal.set_wakeup_fd(-1) == -1  # put back (none was set)


def test_the_stop_deadline_ignores_other_signals():
    expired: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        with (
            sigterm_unwinds(),
            interruptions_deferred(check=False),
            stop_deadline(0.2, expired.append),
        ):
            os.kill(os.getpid(), signal.SIGUSR1)  # a Python handler: written to the fd too
            time.sleep(0.5)
            assert expired == []
            os.kill(os.getpid(), signal.SIGTERM)  # the control: this one is watched
            started = time.monotonic()
            while not expired and time.monotonic() - started < 10:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert expired == [signal.SIGTERM]


def _signal_myself() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_forked_childs_signal_does_not_start_the_parents_deadline():
    """A child forked while the deadline runs inherits the wakeup fd; its own SIGTERM (it
    inherited the Python handler too) must not be taken for the parent's."""
    expired: list[int] = []
    context = multiprocessing.get_context("fork")
    with sigterm_unwinds(), stop_deadline(0.2, expired.append):
        child = context.Process(target=_signal_myself)
        child.start()
        child.join(10)
        time.sleep(0.5)
    assert child.exitcode is not None
    assert expired == []


def test_workers_are_killed_at_once_before_an_exit_that_skips_the_reaper():
    batches = start_workers(_loader())
    workers = list(batches._workers)  # type: ignore[attr-defined]
    # torch's SIGCHLD handler would raise here for each killed worker (the process that
    # calls kill_workers_now exits at once instead).
    sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        assert all(w.is_alive() for w in workers)
        kill_workers_now()
        for worker in workers:
            worker.join(10)
        assert [w.exitcode for w in workers] == [-signal.SIGKILL] * len(workers)
    finally:
        signal.signal(signal.SIGCHLD, sigchld)
        stop_workers(batches)


def _die_holding(lock: Any) -> None:
    if lock.acquire(timeout=10):
        os.kill(os.getpid(), signal.SIGKILL)


def _leave_locked(lock: Any) -> None:
    """Make ``lock`` held for good, as by a worker killed while it read the event."""
    context = multiprocessing.get_context("fork")
    holder = context.Process(target=_die_holding, args=(lock,), daemon=True)
    holder.start()
    try:
        holder.join(20)
    finally:
        holder.kill()  # never left behind for pytest's exit to wait on
    assert holder.exitcode == -signal.SIGKILL
    assert not lock.acquire(timeout=0.1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("a_worker_died", [True, False], ids=["worker-killed", "lock-only"])
def test_a_done_event_left_locked_does_not_hang_the_shutdown(a_worker_died: bool):
    """torch's shutdown sets the "done" event, whose lock a worker killed by a signal (the OOM
    killer) may hold for good: the workers are killed instead of waiting forever. Without a
    dead worker to tell, the lock is probed with a time limit."""
    batches = start_workers(_loader())
    workers = list(batches._workers)  # type: ignore[attr-defined]
    sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        assert next(batches).tolist() == [0, 1]
        # Locked first: a worker killed now could hold the lock, and the holder wait for it.
        _leave_locked(batches._workers_done_event._cond)  # type: ignore[attr-defined]
        if a_worker_died:
            workers[0].kill()
            workers[0].join(10)
        # As torch's pin-memory thread of a CUDA run (CPU-only torch starts none).
        pin_done = threading.Event()
        pinning = threading.Thread(target=pin_done.wait, daemon=True)
        pinning.start()
        batches._pin_memory_thread_done_event = pin_done  # type: ignore[attr-defined]
        started = time.monotonic()
        stop_workers(batches)
        took = time.monotonic() - started
    finally:
        signal.signal(signal.SIGCHLD, sigchld)
    pinning.join(5)
    assert not pinning.is_alive()
    assert all(not w.is_alive() for w in workers)
    assert batches._shutdown  # type: ignore[attr-defined]
    assert not batches._worker_pids_set  # type: ignore[attr-defined]
    batches._shutdown_workers()  # type: ignore[attr-defined]  # as its finaliser: a no-op now
    # The probe waits its limit only when no dead worker tells the lock may be held.
    probe = interrupts._LOCK_PROBE_S
    assert took < probe if a_worker_died else took >= probe


@pytest.mark.timeout(60)
def test_a_worker_dying_while_the_lock_is_probed_does_not_raise_out_of_the_shutdown():
    """With torch's SIGCHLD handler armed (as in a run), a worker the OOM killer ends during
    the probe would raise torch's "killed by signal" error out of the shutdown, leaving the
    other workers alive and the iterator's finaliser to hang on the lock."""
    batches = start_workers(_loader())
    workers = list(batches._workers)  # type: ignore[attr-defined]
    try:
        assert next(batches).tolist() == [0, 1]
        _leave_locked(batches._workers_done_event._cond)  # type: ignore[attr-defined]
        killer = threading.Timer(interrupts._LOCK_PROBE_S / 3, workers[1].kill)
        killer.start()
        stop_workers(batches)  # the probe is waiting when the worker dies
        killer.join()
    finally:
        with contextlib.suppress(RuntimeError):  # only if the test failed: torch's error
            interrupts._kill(workers)
    assert all(not w.is_alive() for w in workers)
    assert batches._shutdown  # type: ignore[attr-defined]


def test_a_live_loader_is_still_shut_down_by_torchs_protocol():
    batches = start_workers(_loader())
    workers = list(batches._workers)  # type: ignore[attr-defined]
    assert next(batches).tolist() == [0, 1]
    assert interrupts._done_event_may_be_held(batches, workers) is False
    stop_workers(batches)
    assert [w.exitcode for w in workers] == [0] * len(workers)  # ended, not killed


def test_once_the_run_has_stopped_signals_are_only_recorded():
    """The line that says why a run stopped, and its clean-up, are not cut short by a signal
    (torchrun's agent signals the ranks still running once one has failed)."""
    with sigterm_unwinds():
        mark_stopping()
        os.kill(os.getpid(), signal.SIGTERM)  # not raised, though no block defers it
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert pending_interruption() is Interruption.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert not interrupts._stopping
    assert pending_interruption() is Interruption.NONE


def test_repeats_are_only_recorded_also_when_sigterm_is_not_ours(monkeypatch):
    """A process that inherited SIGTERM as ignored (or embeds the trainer with its own
    handler) still gets the Ctrl-C behaviour it asked for."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with sigterm_unwinds(repeats_stop=False):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # left alone
            assert not interrupts._repeats_stop
            with interruptions_deferred(check=False):
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised
                assert pending_interruption() is Interruption.CTRL_C
        assert interrupts._repeats_stop
    finally:
        signal.signal(signal.SIGTERM, previous)
