"""Decoding and resizing in worker processes (``DINO_DECODE_PROCESSES``).

In one Python process every decode thread takes the GIL between Pillow's calls (opening the
file, EXIF, the crop, building arrays), so decoding stops scaling at about a core's worth of
that Python work however many cores there are, and each handover waits behind the event loop.
Here each image goes to one of ``count`` processes (:mod:`service.decode_worker`) that decode,
resize, crop and normalise it; the service receives the float32 ``pixel_values`` and only
copies them into its batch. Dispatch threads (two per process: while one reads what its process
sent, the other hands the process its next image; a :class:`service.fanout.Fanout`) wait on the
processes, so the event loop still just awaits one future per request, and an image not yet
taken by a dispatch thread is dropped when its request is withdrawn (one already waiting in a
thread for its process, at most one per process, is still decoded).

A process that dies (a decoder crash, the kernel's OOM killer) or answers out of protocol is
replaced, and the image it held is tried once more on the fresh one; an image that ends two
processes is refused as corrupt. An image still in its worker after ``timeout_s`` has its worker
killed and replaced, and is refused as too costly to decode (not retried). The output is
bit-identical to decoding in threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from service import errors
from service.decode_worker import (
    ProtocolError,
    receive_exactly,
    receive_header,
    send_header,
    spec_to_json,
)
from service.errors import CorruptImageError, ImageTooComplexError, NotReadyError, ServiceError
from service.fanout import Fanout
from service.prepare import Prepared, PrepareSpec

logger = logging.getLogger(__name__)

_SOCKET_BUFFER_BYTES = 1 << 20
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # where ``service`` is importable
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "service.decode_worker")
"""How a worker starts (in the directory holding the ``service`` package); its descriptor
number is appended."""
RESTART_BACKOFF_S = 5.0
"""After a worker failed to start, images fail at once (503) for this long before another try."""
MAX_TIMEOUT_S = 86_400.0
"""Largest per-image time limit (``poll`` cannot wait much beyond 24 days)."""


class DecodeProcessesStoppedError(RuntimeError):
    """The pool was closed while an image waited for, or was in, a worker."""


class _WorkerDiedError(Exception):
    """The worker ended, or broke the protocol, while it held a job."""


class _WorkerTimeoutError(Exception):
    """The worker held a job longer than the pool's limit; it has been killed."""


class _Worker:
    """One worker process and the service's end of its socket.

    Only the dispatch thread holding it (or the pool, for an idle one) uses its descriptors.
    """

    def __init__(self, command: Sequence[str], start_timeout_s: float) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, "1")  # no linear algebra here: no thread pool per worker
        ours, theirs = socket.socketpair()
        try:
            for end in (ours, theirs):  # room for a whole 224x224 image: one call moves it
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
            self.process = subprocess.Popen(
                [*command, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                cwd=_PACKAGE_ROOT,  # ``-m`` looks here first: no other ``service`` shadows it
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches the service only
            )
        except BaseException:  # whatever failed (a bad command, MemoryError): nothing leaks
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.broken = False
        self.broken_why = ""
        self.reported = False  # its end was already logged as a warning (a timeout)
        try:
            hello = receive_header(self.sock, time.monotonic() + start_timeout_s)
            if "ready" not in hello:
                raise RuntimeError(f"a decode process sent {hello!r} instead of its greeting")
        except TimeoutError as err:  # before OSError, its base class
            self.close()
            raise RuntimeError(
                f"a decode process did not start within {start_timeout_s} s"
            ) from err
        except (EOFError, OSError, ProtocolError) as err:
            self.close()
            raise RuntimeError(
                f"a decode process ended during start-up (exit status {self.process.poll()}); "
                "its error is in the log above"
            ) from err
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def usable(self) -> bool:
        """Whether the next job may go to this worker."""
        return not self.broken and self.process.poll() is None

    def run(
        self,
        data: bytes,
        index: int,
        spec: PrepareSpec,
        spec_json: str,
        timeout_s: float | None = None,
    ) -> Prepared:
        """Prepare one image in the process (blocking).

        Anything that interrupts the exchange half-way leaves the worker :attr:`broken`: its
        socket may still hold the rest of a message.

        Args:
            data: The file's bytes.
            index: Position of the image in its request.
            spec: The request's preparation settings.
            spec_json: ``spec`` as the worker reads it.
            timeout_s: Longest time from handing the worker the file to the last byte of its
                answer (wall-clock); None waits as long as it takes.

        Raises:
            ServiceError: The client error the worker reported.
            RuntimeError: The worker failed otherwise (its traceback is logged).
            _WorkerDiedError: The process ended, its connection broke, or it answered out of
                protocol (the answer's fields are checked before its pixels are read).
            _WorkerTimeoutError: No whole answer within ``timeout_s``; the process has been
                killed.
        """
        outcome: Prepared | Exception
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self.sock.settimeout(timeout_s)  # a worker that stops reading: a timeout too
            try:
                send_header(self.sock, {"size": len(data), "index": index, "spec": spec_json})
                self.sock.sendall(data)  # raw: no copy into a message; the GIL is free meanwhile
            finally:
                self.sock.settimeout(None)
            reply = receive_header(self.sock, deadline)
            if "ok" in reply:
                outcome = self._receive_pixels(reply["ok"], spec, deadline)
            elif "error" in reply:
                error = reply["error"]
                outcome = _client_error(error["class"], error["message"], error["index"])
            else:
                logger.error("a decode process failed on image %d:\n%s", index, reply["failed"])
                outcome = RuntimeError(f"the decode process failed on image {index}; see the log")
        except TimeoutError as err:  # before OSError, its base class
            self.broken = True
            self.broken_why = f"not done with image {index} within {timeout_s:g} s ({err})"
            self.kill()
            raise _WorkerTimeoutError(self.broken_why) from err
        except (EOFError, OSError, ProtocolError, LookupError, TypeError, ValueError) as err:
            self.broken = True
            self.broken_why = str(err) or type(err).__name__
            raise _WorkerDiedError(self.broken_why) from err
        except BaseException as err:  # MemoryError, KeyboardInterrupt: the exchange was cut short
            self.broken = True
            self.broken_why = f"its exchange was cut short ({type(err).__name__})"
            raise
        if isinstance(outcome, Exception):  # a whole answer was read: the worker goes on
            raise outcome
        return outcome

    def _receive_pixels(
        self, ok: dict[str, Any], spec: PrepareSpec, deadline: float | None
    ) -> Prepared:
        width, height = (int(v) for v in ok["processed"])
        shape = tuple(int(v) for v in ok["shape"])
        largest = max(spec.max_side, spec.resolution)
        if shape != (3, height, width) or not (0 < width <= largest and 0 < height <= largest):
            raise ProtocolError(f"pixels of shape {shape} for a {width}x{height} image")
        original_width, original_height = (int(v) for v in ok["original"])
        decode_s, preprocess_s = float(ok["decode_s"]), float(ok["preprocess_s"])
        pixels = np.empty(shape, dtype=np.float32)  # (3, H, W)
        receive_exactly(self.sock, pixels.reshape(-1).data, deadline)
        return Prepared(
            pixels, (original_width, original_height), (width, height), decode_s, preprocess_s
        )

    def wake(self) -> None:
        """Make a blocked read or write on this worker's socket return at once (any thread)."""
        with contextlib.suppress(OSError):  # already closed or shut down
            self.sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """End the process now, without waiting for it (any thread)."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):  # ended meanwhile
                self.process.kill()

    def close(self) -> None:
        """Close the socket and reap the process (killed if it does not leave in 1 s)."""
        self.sock.close()  # the worker's read sees the end and it leaves
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()  # stuck in a long decode
            self.process.wait()


def _client_error(name: object, message: object, index: object) -> ServiceError:
    """The worker's client error as the same class here."""
    text = str(message)
    position = index if isinstance(index, int) else None
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, ServiceError):
        try:
            return cls(text, index=position)
        except TypeError:  # a class with other arguments: none is raised while decoding
            pass
    return CorruptImageError(text, index=position)


class DecodeProcesses:
    """``count`` worker processes; :meth:`prepare` runs in :attr:`threads` (two per worker).

    Args:
        count: Worker processes (with twice as many dispatch threads).
        command: How to start a worker (tests start instrumented ones); its descriptor number
            is appended.
        start_timeout_s: Longest a worker may take to start.
        timeout_s: Longest a worker may hold one image, wall-clock from handing it the file to
            the last byte of its answer (at most :data:`MAX_TIMEOUT_S`); beyond it the worker
            is killed and replaced and the image is refused with
            :class:`ImageTooComplexError`. None: no limit.
        on_restart: Called (in a dispatch thread) each time a worker that ended, or was killed
            for taking too long, is replaced.
    """

    def __init__(
        self,
        count: int,
        *,
        command: Sequence[str] = WORKER_COMMAND,
        start_timeout_s: float = 60.0,
        timeout_s: float | None = None,
        on_restart: Callable[[], object] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if timeout_s is not None and not 0 < timeout_s <= MAX_TIMEOUT_S:  # NaN fails too
            raise ValueError(
                f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}] or None, got {timeout_s}"
            )
        self.timeout_s = timeout_s
        self.count = count
        self._command = tuple(command)
        self._start_timeout_s = start_timeout_s
        self._on_restart = on_restart
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._failed_start_at: float | None = None
        self.restarts = 0
        # Two dispatch threads per worker: one reads the pixels the worker sent while the other
        # hands it the next image.
        self.threads = Fanout(
            2 * count, name="decode-dispatch", closed_error=DecodeProcessesStoppedError
        )

    def start(self) -> None:
        """Start every worker (blocking; they start in parallel).

        Raises:
            RuntimeError: A worker could not start; the others are stopped.
        """
        starter = ThreadPoolExecutor(self.count, thread_name_prefix="decode-start")
        try:
            futures = [starter.submit(self._spawn) for _ in range(self.count)]
            failures = [err for f in futures if (err := f.exception()) is not None]
        finally:
            starter.shutdown()
        if failures:
            with self._lock:
                started = list(self._workers)
            self.close()
            for worker in started:  # no thread holds them: never handed out
                worker.close()
            raise RuntimeError(f"cannot start the decode processes: {failures[0]}") from failures[0]
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            self._idle.put(worker)
        logger.info("started %d decode processes", self.count)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._lock:
            return sorted(worker.pid for worker in self._workers if worker.usable)

    def prepare(self, data: bytes, index: int, spec: PrepareSpec) -> Prepared:
        """Decode and preprocess one image in a worker (blocking; call it in :attr:`threads`).

        Raises:
            ServiceError: A client error, as decoding in a thread would raise it; an image that
                ended two worker processes is a :class:`CorruptImageError`, one still in its
                worker after :attr:`timeout_s` an :class:`ImageTooComplexError`;
                :class:`NotReadyError` (503) while a worker cannot be started.
            RuntimeError: The worker failed on the server's side.
            DecodeProcessesStoppedError: The pool was closed.
        """
        spec_json = _spec_json(spec)
        worker = self._take()
        try:
            if not worker.usable:  # ended while idle, or left broken: not this image's doing
                worker = self._replace(worker, None, worker.broken_why or "it had ended while idle")
            try:
                try:
                    prepared = worker.run(data, index, spec, spec_json, self.timeout_s)
                except _WorkerDiedError as first:
                    worker = self._replace(worker, index, str(first))
                    try:
                        prepared = worker.run(data, index, spec, spec_json, self.timeout_s)
                    except _WorkerDiedError as second:
                        raise CorruptImageError(
                            "decoding this image ended the decode process twice; "
                            "the file is refused",
                            index=index,
                        ) from second
            except _WorkerTimeoutError as slow:  # the worker is killed; _release replaces it
                logger.warning(
                    "decode process %d was killed: image %d took longer than %g s",
                    worker.pid,
                    index,
                    self.timeout_s,
                )
                worker.reported = True
                raise ImageTooComplexError(
                    f"decoding this image took longer than {self.timeout_s:g} s; "
                    "the file is refused",
                    index=index,
                ) from slow
        finally:
            self._release(worker)
        return prepared

    def close(self) -> None:
        """Stop every worker and the dispatch threads; images in or waiting for a worker fail.

        Every process is killed at once and reaped; a dispatch thread blocked on one returns
        (its socket is shut down) and closes that worker's descriptors itself (closing them
        here could pull them from under its read).
        """
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        self.threads.close()
        for worker in workers:
            worker.wake()
            worker.kill()
        for worker in workers:
            worker.process.wait()
        with self._lock:
            self._workers.clear()
        drained = []
        while True:  # idle workers: no thread holds them
            try:
                idle = self._idle.get_nowait()
            except queue.Empty:
                break
            self._forget(idle)
            idle.close()
            drained.append(idle)
        for idle in drained:  # a thread waiting for a worker gets a closed one, and stops
            self._idle.put(idle)

    def _spawn(self) -> _Worker:
        worker = _Worker(self._command, self._start_timeout_s)
        with self._lock:
            stale = self._closed
            if not stale:
                self._workers.add(worker)
        if stale:
            worker.close()
            raise DecodeProcessesStoppedError("the decode processes have stopped")
        return worker

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)

    def _take(self) -> _Worker:
        if self._closed:
            raise DecodeProcessesStoppedError("the decode processes have stopped")
        return self._idle.get()  # the other thread of a pair waits here while its worker runs

    def _release(self, worker: _Worker) -> None:
        """Give ``worker`` back; a broken one is replaced first, if that can be done now."""
        if self._closed:
            self._forget(worker)
            worker.close()
            self._idle.put(worker)  # a thread still in line finds it unusable and stops
            return
        if not worker.usable:
            try:
                worker = self._replace(worker, None, worker.broken_why or "it had ended")
            except Exception:  # logged; the next image tries again
                logger.debug("the replacement of a decode process failed", exc_info=True)
        self._idle.put(worker)

    def _replace(self, worker: _Worker, index: int | None, why: str) -> _Worker:
        """Reap a dead or broken worker and start its successor (in this dispatch thread).

        Raises:
            DecodeProcessesStoppedError: The pool is closed.
            NotReadyError: The successor could not start (then, for :data:`RESTART_BACKOFF_S`,
                without trying again).
        """
        self._forget(worker)
        worker.kill()
        worker.close()
        if self._closed:
            raise DecodeProcessesStoppedError("the decode processes have stopped")
        failed_at = self._failed_start_at
        if failed_at is not None and time.monotonic() - failed_at < RESTART_BACKOFF_S:
            raise NotReadyError("a decode process could not be restarted; retry in a few seconds")
        held = f" while it held image {index}" if index is not None else ""
        logger.log(
            logging.INFO if worker.reported else logging.WARNING,  # one warning per incident
            "decode process %d ended or broke (exit status %s; %s)%s; starting another",
            worker.pid,
            worker.process.returncode,
            why,
            held,
        )
        started = time.perf_counter()
        try:
            successor = self._spawn()
        except DecodeProcessesStoppedError:
            raise
        except Exception as err:
            self._failed_start_at = time.monotonic()
            logger.error("could not start a decode process: %s", err)
            raise NotReadyError(
                "a decode process could not be restarted; retry in a few seconds"
            ) from err
        self._failed_start_at = None
        with self._lock:
            self.restarts += 1
        if self._on_restart is not None:
            try:
                self._on_restart()
            except Exception:  # a metric's failure must not lose the new worker
                logger.exception("the restart callback failed")
        logger.info(
            "decode process %d replaces %d (%.2f s)",
            successor.pid,
            worker.pid,
            time.perf_counter() - started,
        )
        return successor


_spec_json = functools.lru_cache(maxsize=64)(spec_to_json)
"""``spec`` as JSON, computed once for all the images of a request."""
