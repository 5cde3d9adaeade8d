"""Interruptions of a training run: SIGTERM, Ctrl-C, and the data loader's worker processes.

The trainer turns SIGTERM into :class:`Terminated` (a ``BaseException``, as ``KeyboardInterrupt``
is for Ctrl-C) so that a run unwinds through its clean-up and reports the interruption in one
line. Where the run spends its time (the epochs) both are deferred: the signal is recorded and
raised at the next safe point (:func:`raise_if_interrupted`, each step). Raised wherever the
main thread happens to be, the exception can land inside a library's queue or lock (the
TensorBoard writer's, shared with its thread) and leave it inconsistent, and the run then
hangs on its way out.

The loader workers take no part: they ignore SIGTERM and SIGINT, which a scheduler,
``timeout`` or a terminal sends to the whole process group. A worker ended by a signal may die
holding a lock it shares with the trainer (the loader's "done" event), and the trainer's
shutdown of the loader then waits on that lock forever. The trainer stops its workers itself:
torch's shutdown protocol first, SIGKILL for any that outlive it, and at exit for any still
alive (multiprocessing would send them a SIGTERM they ignore and wait for them). A worker can
still die by a signal it cannot ignore (the OOM killer's SIGKILL); its loader is then shut down
by killing the other workers, not by torch's protocol, which could wait on that lock.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

from torch._C import _remove_worker_pids

__all__ = [
    "ELSEWHERE",
    "SIGTERM_SEEN",
    "Interruption",
    "Terminated",
    "ignore_interrupts_in_worker",
    "interruptions_deferred",
    "kill_workers_now",
    "mark_stopping",
    "pending_interruption",
    "raise_if_interrupted",
    "raise_interruption",
    "sigterm_unwinds",
    "start_workers",
    "stop_deadline",
    "stop_workers",
]

# Seconds a worker gets to end once killed before the trainer stops waiting for it.
_KILL_WAIT_S = 5.0
# A live worker holds the loader's "done" event lock for microseconds; one held this long is
# taken to be held for good.
_LOCK_PROBE_S = 1.0


class Terminated(BaseException):
    """SIGTERM arrived (``docker stop``, a scheduler's time limit, torchrun stopping a job).

    A ``BaseException`` like ``KeyboardInterrupt``, so that it unwinds through the same
    clean-up (the temporary file of a save or an export cut short is removed; the last
    complete checkpoint is kept).
    """


# The message of an interruption raised in a process that was not signalled itself: another
# process of the same run was, and they stop together (see raise_interruption).
ELSEWHERE = "in another process of this run"


class Interruption(enum.IntEnum):
    """What :func:`pending_interruption` reports, ordered so that the maximum over the
    processes of a run is what they all act on (SIGTERM over Ctrl-C)."""

    NONE = 0
    CTRL_C = 1
    SIGTERM = 2


# Set when SIGTERM arrives. The handler's exception can be lost: raised while Python runs a
# finalizer (a logging lock release, a DataLoader's __del__), it is only printed. The flag is
# what the training loop and the error handling trust.
SIGTERM_SEEN = threading.Event()

# Ctrl-C arrived while interruptions were deferred (and is not raised yet).
_CTRL_C_SEEN = threading.Event()

# How many interruptions_deferred() blocks the main thread is in.
_deferring = 0

# Whether a second SIGTERM or Ctrl-C stops the process at once (see sigterm_unwinds).
_repeats_stop = True

# Set once the run has stopped (see mark_stopping): signals are only recorded from then on.
_stopping = False

# The SIGINT handler mark_stopping replaced (put back by sigterm_unwinds), if it did.
_SIGINT_BEFORE_STOPPING: list[Any] = []

# Loader workers started by this process, for the reaper at exit.
_WORKERS: weakref.WeakSet[BaseProcess] = weakref.WeakSet()
_REAPER_REGISTERED = threading.Event()


def _terminate(_signum: int, _frame: object) -> None:
    first = not SIGTERM_SEEN.is_set()
    if _repeats_stop:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    SIGTERM_SEEN.set()
    # A repeat does not cut short the unwinding of the first, nor any signal a stopped run's
    # report and clean-up.
    if first and not _deferring and not _stopping:
        raise Terminated


def _ctrl_c(_signum: int, _frame: object) -> None:
    if _CTRL_C_SEEN.is_set() and _repeats_stop and not _stopping:
        # A second Ctrl-C: the run did not reach a safe point, stop now.
        _CTRL_C_SEEN.clear()
        raise KeyboardInterrupt
    _CTRL_C_SEEN.set()


def raise_if_interrupted() -> None:
    """Raise the SIGTERM (:class:`Terminated`) or Ctrl-C (``KeyboardInterrupt``) that arrived
    while interruptions were deferred, or whose exception a finalizer swallowed (SIGTERM when
    both did, as :func:`pending_interruption` says)."""
    if SIGTERM_SEEN.is_set():
        _CTRL_C_SEEN.clear()
        raise Terminated
    if _CTRL_C_SEEN.is_set():
        _CTRL_C_SEEN.clear()
        raise KeyboardInterrupt


def _pending() -> bool:
    return _CTRL_C_SEEN.is_set() or SIGTERM_SEEN.is_set()


def mark_stopping() -> None:
    """The run has stopped (it returned, or an exception is on its way out): from now on
    SIGTERM and Ctrl-C are only recorded (:data:`SIGTERM_SEEN`), so that the line that says
    why it stopped, and its clean-up, are not cut short. Under torchrun the agent signals the
    ranks still running once one has failed, which is at about that time. Undone when
    :func:`sigterm_unwinds` is left. Main thread only (elsewhere it does nothing).
    """
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        return
    _stopping = True
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _SIGINT_BEFORE_STOPPING.append(signal.signal(signal.SIGINT, _ctrl_c))


def pending_interruption() -> Interruption:
    """The interruption that arrived and is not raised yet (SIGTERM when both did)."""
    if SIGTERM_SEEN.is_set():
        return Interruption.SIGTERM
    if _CTRL_C_SEEN.is_set():
        return Interruption.CTRL_C
    return Interruption.NONE


def raise_interruption(kind: Interruption) -> None:
    """Raise ``kind`` as the processes of a run agreed on it (a no-op for ``NONE``).

    The processes of a distributed run stop at the same step: each reports what it received,
    and one that received nothing (or only Ctrl-C where another got SIGTERM) raises the
    agreed interruption with the message :data:`ELSEWHERE`.
    """
    if kind is Interruption.NONE:
        return
    here = pending_interruption() is kind
    if kind is Interruption.SIGTERM:
        raise Terminated() if here else Terminated(ELSEWHERE)
    if here:
        _CTRL_C_SEEN.clear()
        raise KeyboardInterrupt
    raise KeyboardInterrupt(ELSEWHERE)


@contextlib.contextmanager
def interruptions_deferred(check: bool = True) -> Iterator[None]:
    """Within: SIGTERM and Ctrl-C are only recorded (the code inside calls
    :func:`raise_if_interrupted` at its safe points); a second Ctrl-C still interrupts at
    once. On leaving normally, one that arrived is raised, unless ``check`` is false (then a
    Ctrl-C is dropped when this is the outermost block; SIGTERM stays in SIGTERM_SEEN).

    Only in the main thread (where Python runs signal handlers); SIGTERM is deferred only
    while :func:`sigterm_unwinds` handles it, Ctrl-C only while Python's own handler does.
    """
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigint = signal.getsignal(signal.SIGINT)
    own_sigint = not _deferring and sigint is signal.default_int_handler
    if own_sigint:
        _CTRL_C_SEEN.clear()
        signal.signal(signal.SIGINT, _ctrl_c)
    _deferring += 1
    ctrl_c = False
    try:
        yield
    finally:
        try:  # still deferring: a SIGTERM now cannot cut this short
            if own_sigint:
                signal.signal(signal.SIGINT, sigint)
                ctrl_c = _CTRL_C_SEEN.is_set()  # raised below if checked, else dropped
                _CTRL_C_SEEN.clear()
        finally:
            _deferring -= 1
    if check and ctrl_c and not SIGTERM_SEEN.is_set():
        raise KeyboardInterrupt
    if check:
        raise_if_interrupted()


def _quiet_lost_termination(previous: Any) -> Any:
    """An unraisable-exception hook that drops the Terminated a finalizer swallowed (the flag
    carries it on) and passes everything else to ``previous``."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def sigterm_unwinds(*, repeats_stop: bool = True, then_ignored: bool = False) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, unless someone else handles
    it already (an embedding program's own handler is left alone).

    Args:
        repeats_stop: A second SIGTERM kills the process, and a second Ctrl-C raises at once,
            also while interruptions are deferred (for a run stuck before its next safe
            point). False for a process of a torchrun job: torchrun's agent forwards the
            signal it received to its workers, so each can receive it twice without anyone
            asking twice, and a process that stops on its own leaves the others waiting for
            it in a collective. Repeats are only recorded then (see also
            :func:`stop_deadline`).
        then_ignored: On leaving, ignore SIGTERM and SIGINT from then on instead of putting
            back the previous handlers: the process exits once the block is left, and
            tearing torch down takes a while. torchrun's agent signals the ranks still
            running once one has failed (exited non-zero, 143 included); a rank that has
            already said why it stopped must not be killed meanwhile (its exit status would
            become -15) or raise at shutdown.
    """
    global _repeats_stop, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    own = previous is signal.SIG_DFL  # else SIGTERM stays as it is (ignored, or handled)
    _repeats_stop = repeats_stop  # for Ctrl-C also when SIGTERM is not ours
    if own:
        SIGTERM_SEEN.clear()
        hook = sys.unraisablehook
        sys.unraisablehook = _quiet_lost_termination(hook)
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if then_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        elif _SIGINT_BEFORE_STOPPING:
            signal.signal(signal.SIGINT, _SIGINT_BEFORE_STOPPING[0])
        _SIGINT_BEFORE_STOPPING.clear()
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if then_ignored else previous)
            sys.unraisablehook = hook
            SIGTERM_SEEN.clear()
        _repeats_stop = True
        _stopping = False
        _CTRL_C_SEEN.clear()


@contextlib.contextmanager
def stop_deadline(seconds: float, expire: Callable[[int], None]) -> Iterator[None]:
    """Within: call ``expire(signum)`` from a watcher thread if the block is still running
    ``seconds`` after the first SIGTERM or Ctrl-C arrived (``expire`` is expected to end the
    process: ``os._exit``).

    For a process of a distributed run, whose main thread can be blocked in a collective
    that waits for a process that has gone (NCCL has no timeout shorter than the process
    group's): Python runs its signal handlers only between bytecodes of the main thread, so
    they never run then, and the process would wait for the SIGKILL at the end of the grace
    period without a line saying why. The C-level handler also writes the signal number to
    the wakeup fd (:func:`signal.set_wakeup_fd`), which the watcher reads at once. Only
    signals with a Python handler are seen (SIGTERM under :func:`sigterm_unwinds`, SIGINT
    with Python's or this module's handler). Main thread only (elsewhere it does nothing).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    done = threading.Event()
    if not _FORK_HOOK_REGISTERED.is_set():
        _FORK_HOOK_REGISTERED.set()
        os.register_at_fork(after_in_child=_no_wakeup_fd_in_child)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _WAKEUP_FDS.append(write_fd)
    watcher = threading.Thread(
        target=_watch_deadline,
        args=(read_fd, seconds, done, expire),
        name="stop-deadline",
        daemon=True,
    )
    try:
        watcher.start()
        yield
    finally:
        signal.set_wakeup_fd(previous)
        _WAKEUP_FDS.remove(write_fd)
        done.set()
        with contextlib.suppress(OSError):  # wake the watcher (a full pipe wakes it too)
            os.write(write_fd, b"\0")
        if watcher.is_alive():
            watcher.join(1.0)
        os.close(write_fd)
        if not watcher.is_alive():  # else it may still read it; the process is ending
            os.close(read_fd)


# The wakeup fds stop_deadline set (a forked child must not write its own signals there).
_WAKEUP_FDS: list[int] = []
_FORK_HOOK_REGISTERED = threading.Event()


def _no_wakeup_fd_in_child() -> None:
    """After a fork, in the child: a signal it receives (with a Python handler inherited from
    the parent) is not the parent's, and must not start the parent's deadline."""
    if _WAKEUP_FDS:
        with contextlib.suppress(ValueError):  # forked from a thread other than the main one
            signal.set_wakeup_fd(-1)
        _WAKEUP_FDS.clear()


def kill_workers_now() -> None:
    """SIGKILL the loader workers still alive, waiting for nothing and taking no lock (for a
    process about to ``os._exit``, which skips the reaper at exit; they ignore SIGTERM)."""
    with contextlib.suppress(RuntimeError):  # the set changed meanwhile: kill what was seen
        for worker in list(_WORKERS):
            pid, popen = worker.pid, getattr(worker, "_popen", None)
            # Not one already reaped (its pid could be another process's by now).
            if pid is not None and getattr(popen, "returncode", 0) is None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _watch_deadline(
    read_fd: int, seconds: float, done: threading.Event, expire: Callable[[int], None]
) -> None:
    """The thread of :func:`stop_deadline`."""
    watched = {int(signal.SIGTERM), int(signal.SIGINT)}
    signum = 0
    deadline: float | None = None
    while not done.is_set():
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready, _, _ = select.select([read_fd], [], [], timeout)
        if done.is_set():
            return
        if ready:
            with contextlib.suppress(BlockingIOError):
                for number in os.read(read_fd, 512):
                    if deadline is None and number in watched:
                        signum, deadline = number, time.monotonic() + seconds
            continue
        if deadline is not None and time.monotonic() >= deadline:
            expire(signum)
            return


def ignore_interrupts_in_worker() -> None:
    """Make this loader worker ignore SIGTERM and SIGINT (call first in ``worker_init_fn``).

    A signal to the process group reaches the trainer, which stops its workers itself (see the
    module docstring). The worker was started with both signals blocked (see
    :func:`start_workers`); one that arrived since is pending, and is discarded here.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def start_workers(loader: Iterable[Any], *, check: bool = True) -> Iterator[Any]:
    """``iter(loader)``: a new loader iterator, whose workers start with SIGTERM and SIGINT
    blocked until :func:`ignore_interrupts_in_worker` runs in them.

    A SIGTERM or Ctrl-C arriving meanwhile is held back until the iterator is whole, then
    raised here with its workers stopped: raised in the middle of torch's iterator set-up, it
    would leave started workers that nothing shuts down (torch's clean-up of a half-built
    iterator fails with an AttributeError). With ``check`` false it is only recorded (the
    caller raises it where the processes of a run agree to stop).
    """
    before = set(multiprocessing.active_children())
    if not hasattr(signal, "pthread_sigmask") or (
        threading.current_thread() is not threading.main_thread()
    ):
        return _track(iter(loader), before)
    with interruptions_deferred(check=False):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())  # read only: nothing to undo
        try:
            # Inside the try: blocking runs pending handlers, which may raise (a second Ctrl-C).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            batches = _track(iter(loader), before)
        except BaseException:
            _kill(_new_workers(before))  # the workers of a half-built iterator
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal lands here
        if check and _pending():
            stop_workers(batches)
            raise_if_interrupted()
    return batches


def _new_workers(before: set[BaseProcess]) -> list[BaseProcess]:
    """The loader workers started since ``before`` (torch's worker processes run
    ``_worker_loop``; other children of this process are not ours to stop)."""

    def target(process: BaseProcess) -> str:
        return str(getattr(getattr(process, "_target", None), "__name__", ""))

    return [
        p
        for p in multiprocessing.active_children()
        if p not in before and target(p) == "_worker_loop"
    ]


def _track(batches: Iterator[Any], before: set[BaseProcess]) -> Iterator[Any]:
    """Remember the workers of ``batches`` (a new iterator) for the reaper at exit."""
    workers = {*getattr(batches, "_workers", ()), *_new_workers(before)}
    for worker in workers:
        _WORKERS.add(worker)
    if workers and not _REAPER_REGISTERED.is_set():
        _REAPER_REGISTERED.set()
        atexit.register(_reap)  # after multiprocessing's exit hook, so it runs before it
    return batches


def stop_workers(batches: Iterator[Any]) -> None:
    """Shut down a loader iterator's workers now (a no-op for one without workers).

    torch's protocol first (it asks each worker to end and waits a few seconds); a worker
    still alive after it is killed. Where that protocol could wait forever (a worker died by a
    signal, possibly holding the loader's "done" event), the workers are killed at once.

    Called while a run unwinds: an exception's traceback holds the iterator alive until the
    garbage collector breaks the cycle, which may be at interpreter exit. A worker failure
    torch reports during the shutdown is not the error being reported.
    """
    workers = list(getattr(batches, "_workers", ()))
    shutdown: Callable[[], None] | None = getattr(batches, "_shutdown_workers", None)
    try:
        if callable(shutdown):
            with _sigchld_set_aside():  # a worker dying meanwhile must not raise out of here
                held = _done_event_may_be_held(batches, workers)
                if held:
                    _abandon(batches)
            if not held:
                with contextlib.suppress(RuntimeError):
                    shutdown()
    finally:
        _kill(workers)


def _done_event_may_be_held(batches: Any, workers: Iterable[BaseProcess]) -> bool:
    """Whether torch's shutdown of ``batches`` could wait forever on its "done" event.

    Each worker takes the event's lock to read it; one killed by a signal meanwhile (the OOM
    killer, :func:`kill_workers_now`) leaves it held for good, and torch's shutdown sets the
    event. A worker dead by a signal, or a lock still taken after :data:`_LOCK_PROBE_S`, means
    the workers are killed instead.
    """
    if getattr(batches, "_shutdown", True):
        return False  # torch's shutdown has run already and returns at once
    if any((w.exitcode or 0) < 0 for w in workers):
        return True
    lock = getattr(getattr(batches, "_workers_done_event", None), "_cond", None)
    if lock is None:
        return False
    if not lock.acquire(timeout=_LOCK_PROBE_S):
        return True
    lock.release()
    return False


def _abandon(batches: Any) -> None:
    """Mark ``batches`` shut down without torch's protocol (its workers are killed next): its
    finaliser then does nothing, torch's SIGCHLD handler no longer watches its workers, its
    pin-memory thread (CUDA runs) is told to end, and its index queues are closed without
    waiting on their feeder threads.

    Nothing is put on the workers' result queue (torch wakes the pin-memory thread so): its
    write lock may be held by a killed worker. The thread ends by itself at its next poll.
    """
    batches._shutdown = True
    pin_done = getattr(batches, "_pin_memory_thread_done_event", None)
    if pin_done is not None:
        pin_done.set()
    if getattr(batches, "_worker_pids_set", False):
        _remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for queue in getattr(batches, "_index_queues", ()):
        queue.cancel_join_thread()
        queue.close()


def _kill(workers: Iterable[BaseProcess]) -> None:
    """SIGKILL the live ones of ``workers`` and wait for them (briefly).

    torch's SIGCHLD handler raises, at whatever line the main thread is on, for a worker it
    still watches that dies by a signal (at exit nothing has told it to stop watching): it is
    set aside meanwhile, or its error could cut this short with workers left alive.
    """
    alive = [w for w in workers if w.is_alive()]
    if not alive:
        return
    with _sigchld_set_aside():
        for worker in alive:
            with contextlib.suppress(OSError, ValueError):
                worker.kill()
        for worker in alive:
            with contextlib.suppress(RuntimeError, ValueError):  # off the main thread
                worker.join(_KILL_WAIT_S)


@contextlib.contextmanager
def _sigchld_set_aside() -> Iterator[None]:
    """SIGCHLD at its default meanwhile (on the main thread; elsewhere it cannot be changed,
    and Python runs handlers only on the main thread anyway), then the handler as it was."""
    sigchld = getattr(signal, "SIGCHLD", None)
    previous = None
    if sigchld is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(sigchld, signal.SIG_DFL)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(sigchld, previous)  # type: ignore[arg-type]


def _reap() -> None:
    """At exit: kill the loader workers still alive (they ignore multiprocessing's SIGTERM)."""
    _kill(list(_WORKERS))
