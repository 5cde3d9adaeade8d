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
alive (multiprocessing would send them a SIGTERM they ignore and wait for them).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = [
    "SIGTERM_SEEN",
    "Terminated",
    "ignore_interrupts_in_worker",
    "interruptions_deferred",
    "raise_if_interrupted",
    "sigterm_unwinds",
    "start_workers",
    "stop_workers",
]

# Seconds a worker gets to end once killed before the trainer stops waiting for it.
_KILL_WAIT_S = 5.0


class Terminated(BaseException):
    """SIGTERM arrived (``docker stop``, a scheduler's time limit, torchrun stopping a job).

    A ``BaseException`` like ``KeyboardInterrupt``, so that it unwinds through the same
    clean-up (the temporary file of a save or an export cut short is removed; the last
    complete checkpoint is kept).
    """


# Set when SIGTERM arrives. The handler's exception can be lost: raised while Python runs a
# finalizer (a logging lock release, a DataLoader's __del__), it is only printed. The flag is
# what the training loop and the error handling trust.
SIGTERM_SEEN = threading.Event()

# Ctrl-C arrived while interruptions were deferred (and is not raised yet).
_CTRL_C_SEEN = threading.Event()

# How many interruptions_deferred() blocks the main thread is in.
_deferring = 0

# Loader workers started by this process, for the reaper at exit.
_WORKERS: weakref.WeakSet[BaseProcess] = weakref.WeakSet()
_REAPER_REGISTERED = threading.Event()


def _terminate(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    SIGTERM_SEEN.set()
    if not _deferring:
        raise Terminated


def _ctrl_c(_signum: int, _frame: object) -> None:
    if _CTRL_C_SEEN.is_set():  # a second Ctrl-C: the run did not reach a safe point, stop now
        _CTRL_C_SEEN.clear()
        raise KeyboardInterrupt
    _CTRL_C_SEEN.set()


def raise_if_interrupted() -> None:
    """Raise the Ctrl-C (``KeyboardInterrupt``) or SIGTERM (:class:`Terminated`) that arrived
    while interruptions were deferred, or whose exception a finalizer swallowed."""
    if _CTRL_C_SEEN.is_set():
        _CTRL_C_SEEN.clear()
        raise KeyboardInterrupt
    if SIGTERM_SEEN.is_set():
        raise Terminated


def _pending() -> bool:
    return _CTRL_C_SEEN.is_set() or SIGTERM_SEEN.is_set()


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
    if check and ctrl_c:
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
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, unless someone else handles
    it already (an embedding program's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    SIGTERM_SEEN.clear()
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_lost_termination(hook)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook
        SIGTERM_SEEN.clear()


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


def start_workers(loader: Iterable[Any]) -> Iterator[Any]:
    """``iter(loader)``: a new loader iterator, whose workers start with SIGTERM and SIGINT
    blocked until :func:`ignore_interrupts_in_worker` runs in them.

    A SIGTERM or Ctrl-C arriving meanwhile is held back until the iterator is whole, then
    raised here with its workers stopped: raised in the middle of torch's iterator set-up, it
    would leave started workers that nothing shuts down (torch's clean-up of a half-built
    iterator fails with an AttributeError).
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
        if _pending():
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
    still alive after it is killed. Called while a run unwinds: an exception's traceback holds
    the iterator alive until the garbage collector breaks the cycle, which may be at
    interpreter exit. A worker failure torch reports during the shutdown is not the error
    being reported.
    """
    shutdown: Callable[[], None] | None = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        with contextlib.suppress(RuntimeError):
            shutdown()
    _kill(getattr(batches, "_workers", ()))


def _kill(workers: Iterable[BaseProcess]) -> None:
    """SIGKILL the live ones of ``workers`` and wait for them (briefly).

    torch's SIGCHLD handler raises, at whatever line the main thread is on, for a worker it
    still watches that dies by a signal (at exit nothing has told it to stop watching): it is
    set aside meanwhile, or its error could cut this short with workers left alive.
    """
    alive = [w for w in workers if w.is_alive()]
    if not alive:
        return
    sigchld = getattr(signal, "SIGCHLD", None)
    previous = None
    if sigchld is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(sigchld, signal.SIG_DFL)
    try:
        for worker in alive:
            with contextlib.suppress(OSError, ValueError):
                worker.kill()
        for worker in alive:
            with contextlib.suppress(RuntimeError, ValueError):  # off the main thread
                worker.join(_KILL_WAIT_S)
    finally:
        if previous is not None:
            signal.signal(sigchld, previous)  # type: ignore[arg-type]


def _reap() -> None:
    """At exit: kill the loader workers still alive (they ignore multiprocessing's SIGTERM)."""
    _kill(list(_WORKERS))
