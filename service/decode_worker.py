"""``python -m service.decode_worker FD``: one decode process of ``DINO_DECODE_PROCESSES``.

The service starts it with one end of a socket pair as file descriptor ``FD`` and talks to it
with :class:`multiprocessing.connection.Connection` messages:

* worker -> service, once: ``("ready", pid)``.
* service -> worker, per image: ``(size, index, spec)`` (a pickled
  :class:`service.prepare.PrepareSpec`, the same bytes for every image of a request), then the
  file's ``size`` bytes, raw.
* worker -> service: ``("ok", original_size, processed_size, decode_s, resize_s, shape)``
  followed by the ``shape`` uint8 pixels, raw; or ``("error", class_name, message, index)``
  for a client error (a :class:`service.errors.ServiceError`); or ``("failed", traceback)``
  for anything else.

Headers are pickled :class:`multiprocessing.connection.Connection` messages; the payloads go
through the same socket unframed (their sizes are in the headers), so neither side copies them
into a pickle and the GIL is released while they move.

It handles one image at a time and exits when the service closes its end. It imports only the
decoding and preprocessing modules (no onnxruntime, no web framework), and ignores Ctrl-C, which
reaches the service, whose shutdown stops it.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import socket
import sys
import traceback
import warnings
from collections.abc import Sequence
from multiprocessing.connection import Connection

from service.errors import ServiceError
from service.prepare import PrepareSpec, resize_image


def serve(conn: Connection, sock: socket.socket) -> None:
    """Answer jobs until the service closes its end.

    Args:
        conn: Framed, pickled headers.
        sock: The same socket, for the raw payloads.
    """
    conn.send(("ready", os.getpid()))
    while True:
        try:
            size, index, pickled_spec = conn.recv()
            data = bytearray(size)
            receive_exactly(sock, memoryview(data))
        except (EOFError, ConnectionResetError):
            return
        try:
            resized = resize_image(bytes(data), index, _unpickled(pickled_spec))
        except ServiceError as err:
            conn.send(("error", type(err).__name__, err.message, err.index))
            continue
        except Exception:  # a bug or a resource failure: the service answers it with a 500
            conn.send(("failed", traceback.format_exc()))
            continue
        header = (
            resized.original_size,
            resized.processed_size,
            resized.decode_s,
            resized.resize_s,
            resized.rgb.shape,
        )
        conn.send(("ok", *header))
        sock.sendall(resized.rgb.reshape(-1).data)  # (H, W, 3) uint8, flat


@functools.lru_cache(maxsize=64)
def _unpickled(pickled_spec: bytes) -> PrepareSpec:
    spec = pickle.loads(pickled_spec)  # from the service that started this process
    if not isinstance(spec, PrepareSpec):
        raise TypeError(f"expected a PrepareSpec, got {type(spec).__name__}")
    return spec


def receive_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``.

    Raises:
        EOFError: The other end closed the socket first.
    """
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:])
        if count == 0:
            raise EOFError("the connection closed in the middle of a message")
        received += count


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker on the inherited descriptor named by the first argument.

    Returns:
        0 when the service closed the connection, 2 for a bad command line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m service.decode_worker FD (started by the service)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.filterwarnings("ignore", module=r"PIL\.")  # as the service: errors become answers
    fd = int(args[0])
    sock = socket.socket(fileno=os.dup(fd))
    conn = Connection(fd)
    try:
        serve(conn, sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service went away while this worker answered
    finally:
        conn.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
