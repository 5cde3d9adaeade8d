"""Decoding and resizing in worker processes (``DINO_DECODE_PROCESSES``).

In one Python process every decode thread takes the GIL between Pillow's calls (opening the
file, EXIF, the crop, building arrays), so decoding stops scaling at about a core's worth of
that Python work however many cores there are, and each handover waits behind the event loop.
Here each image goes to one of ``count`` processes (:mod:`service.decode_worker`) that decode,
resize and crop it; the service receives 8-bit pixels and only normalises them. A dispatch
thread per process waits on it, so the event loop still just awaits a future per image, and an
image not yet handed to a process is dropped when its request is withdrawn.

A process that dies (a decoder crash, the kernel's OOM killer) is replaced, and the image it
held is tried once more on the fresh one; an image that ends two processes is refused as
corrupt. The output is bit-identical to decoding in threads.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from service import errors
from service.decode_worker import receive_exactly
from service.errors import CorruptImageError, ServiceError
from service.prepare import Prepared, PrepareSpec, Resized, finish

logger = logging.getLogger(__name__)

_SOCKET_BUFFER_BYTES = 1 << 20
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "service.decode_worker")
"""How a worker starts; its descriptor number is appended."""


class DecodeProcessesStoppedError(RuntimeError):
    """The pool was closed while an image waited for, or was in, a worker."""


class _WorkerDiedError(Exception):
    """The worker process ended while it held a job."""


class _Worker:
    """One worker process and the service's end of its socket."""

    def __init__(self, command: Sequence[str], start_timeout_s: float) -> None:
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):  # room for a whole 224x224 image: one call moves it
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where ``service`` is importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(
                [*command, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches the service only
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours  # raw payloads; ``conn`` (a duplicate descriptor) frames the headers
        self.conn = Connection(os.dup(ours.fileno()))
        try:
            if not self.conn.poll(start_timeout_s):
                raise RuntimeError(f"a decode process did not start within {start_timeout_s} s")
            hello = self.conn.recv()
            if not (isinstance(hello, tuple) and hello[:1] == ("ready",)):
                raise RuntimeError(f"a decode process sent {hello!r} instead of its greeting")
        except (EOFError, OSError) as err:
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

    def run(self, data: bytes, index: int, spec: PrepareSpec) -> Resized:
        """Resize one image in the process (blocking).

        Raises:
            ServiceError: The client error the worker reported.
            RuntimeError: The worker failed otherwise (its traceback is logged).
            _WorkerDiedError: The process ended, or its connection broke, during the job.
        """
        try:
            self.conn.send((len(data), index, _pickled(spec)))
            self.sock.sendall(data)  # raw: no pickling copy, and the GIL is free meanwhile
            reply = self.conn.recv()
            if reply[0] == "ok":
                original, processed, decode_s, resize_s, shape = reply[1:]
                rgb = np.empty(shape, dtype=np.uint8)  # (H, W, 3)
                receive_exactly(self.sock, rgb.reshape(-1).data)
                return Resized(rgb, original, processed, decode_s, resize_s)
        except (EOFError, OSError) as err:
            raise _WorkerDiedError(str(err) or type(err).__name__) from err
        if reply[0] == "error":
            raise _client_error(*reply[1:])
        logger.error("a decode process failed on image %d:\n%s", index, reply[1])
        raise RuntimeError(f"the decode process failed on image {index}; see the service log")

    def close(self) -> None:
        """Close the connection and end the process (at once if it does not leave by itself)."""
        self.conn.close()
        self.sock.close()  # the worker's recv sees the end and returns
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()  # stuck in a long decode
            self.process.wait()


@functools.lru_cache(maxsize=64)
def _pickled(spec: PrepareSpec) -> bytes:
    """``spec`` pickled once for all the images of a request (pickling it costs 0.1 ms)."""
    return pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)


def _client_error(name: str, message: str, index: int | None) -> ServiceError:
    """The worker's client error as the same class here."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ServiceError):
        try:
            return cls(message, index=index)
        except TypeError:  # a class with other arguments: none is raised while decoding
            pass
    return CorruptImageError(message, index=index)


class DecodeProcesses:
    """``count`` worker processes; :meth:`prepare` runs in :attr:`executor`'s threads.

    Args:
        count: Worker processes (and dispatch threads).
        command: How to start a worker (tests start instrumented ones); its descriptor number
            is appended.
        start_timeout_s: Longest a worker may take to start.
        on_restart: Called (in a dispatch thread) each time a worker that ended is replaced.
    """

    def __init__(
        self,
        count: int,
        *,
        command: Sequence[str] = WORKER_COMMAND,
        start_timeout_s: float = 60.0,
        on_restart: Callable[[], object] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.count = count
        self._command = tuple(command)
        self._start_timeout_s = start_timeout_s
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0
        self._on_restart = on_restart
        self.executor = ThreadPoolExecutor(count, thread_name_prefix="decode-dispatch")

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
            self.close()
            raise RuntimeError(f"cannot start the decode processes: {failures[0]}") from failures[0]
        for worker in list(self._workers):
            self._idle.put(worker)
        logger.info("started %d decode processes", self.count)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._lock:
            return sorted(worker.pid for worker in self._workers)

    def prepare(self, data: bytes, index: int, spec: PrepareSpec) -> Prepared:
        """Decode and preprocess one image in a worker (blocking; call it in :attr:`executor`).

        Raises:
            ServiceError: A client error, as decoding in a thread would raise it; an image that
                ended two worker processes is a :class:`CorruptImageError`.
            RuntimeError: The worker failed on the server's side.
            DecodeProcessesStoppedError: The pool was closed.
        """
        worker = self._take()
        try:
            if worker.process.poll() is not None:  # ended while idle: not this image's doing
                worker = self._replace(worker, index, _WorkerDiedError("ended while idle"))
            try:
                resized = worker.run(data, index, spec)
            except _WorkerDiedError as first:
                worker = self._replace(worker, index, first)
                try:
                    resized = worker.run(data, index, spec)
                except _WorkerDiedError as second:
                    worker = self._replace(worker, index, second)
                    raise CorruptImageError(
                        "decoding this image ended the decode process twice; the file is refused",
                        index=index,
                    ) from second
        finally:
            self._idle.put(worker)
        return finish(resized, spec.recipe)

    def close(self) -> None:
        """Stop every worker and the dispatch threads; images still waiting fail."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.close()

    def _spawn(self) -> _Worker:
        worker = _Worker(self._command, self._start_timeout_s)
        with self._lock:
            if self._closed:
                stale = True
            else:
                stale = False
                self._workers.add(worker)
        if stale:
            worker.close()
            raise DecodeProcessesStoppedError("the decode processes have stopped")
        return worker

    def _take(self) -> _Worker:
        if self._closed:
            raise DecodeProcessesStoppedError("the decode processes have stopped")
        return self._idle.get()  # one worker per dispatch thread: never waits long

    def _replace(self, worker: _Worker, index: int, cause: _WorkerDiedError) -> _Worker:
        """Reap a dead worker and start its successor (in this dispatch thread)."""
        with self._lock:
            closed = self._closed
            self._workers.discard(worker)
        worker.close()
        if closed:
            raise DecodeProcessesStoppedError("the decode processes have stopped") from cause
        logger.warning(
            "decode process %d ended (exit status %s; %s) before image %d was done; starting "
            "another",
            worker.pid,
            worker.process.returncode,
            cause,
            index,
        )
        with self._lock:
            self.restarts += 1
        if self._on_restart is not None:
            self._on_restart()
        started = time.perf_counter()
        successor = self._spawn()
        logger.info(
            "decode process %d replaces %d (%.2f s)",
            successor.pid,
            worker.pid,
            time.perf_counter() - started,
        )
        return successor
