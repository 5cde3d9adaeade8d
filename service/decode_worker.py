"""``python -m service.decode_worker FD``: one decode process of ``DINO_DECODE_PROCESSES``.

The service starts it with one end of a socket pair as file descriptor ``FD``. Each message is a
JSON header, framed by :class:`multiprocessing.connection.Connection` (a length, then the
bytes), sometimes followed by a raw payload whose size the header gives:

* worker -> service, once: ``{"ready": pid}``.
* service -> worker, per image: ``{"size", "index", "spec"}`` (:func:`spec_to_json`), then the
  file's ``size`` bytes.
* worker -> service: ``{"ok": {"original", "processed", "decode_s", "preprocess_s",
  "shape"}}`` followed by the normalised ``pixel_values`` of that ``[3, height, width]`` shape
  as float32 in the machine's byte order (:func:`service.prepare.finish`: the service only
  copies them into its batch); or ``{"error": {"class", "message", "index"}}`` for
  a client error (a :class:`service.errors.ServiceError`); or ``{"failed": traceback}`` for
  anything else.

Nothing is unpickled on either side, so bytes out of place (a client's pixels read as a header)
can only fail to parse. The payloads are not copied into the framing, and the GIL is free while
they move. The worker handles one image at a time and exits when the service closes its end;
it ignores SIGINT and SIGTERM (a terminal's Ctrl-C, or a service manager stopping the whole
group), which are the service's to act on: its shutdown ends the workers. It imports only the
decoding and preprocessing modules (no onnxruntime, no web framework).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from models.contract import PreprocessingRecipe
from service.errors import ServiceError
from service.prepare import PrepareSpec, finish, resize_image


class ProtocolError(Exception):
    """A message that does not follow the protocol."""


def spec_to_json(spec: PrepareSpec) -> str:
    """``spec`` as JSON (the recipe in its metadata form); :func:`spec_from_json` inverts it."""
    fields = dataclasses.asdict(spec)
    fields["recipe"] = json.loads(spec.recipe.to_json())
    return json.dumps(fields, sort_keys=True)


@functools.lru_cache(maxsize=64)
def spec_from_json(text: str) -> PrepareSpec:
    """Parse :func:`spec_to_json`'s output (cached: every image of a request shares one).

    Raises:
        ProtocolError: Not a valid spec.
    """
    try:
        fields = json.loads(text)
        recipe = PreprocessingRecipe.from_json(json.dumps(fields.pop("recipe")))
        return PrepareSpec(recipe=recipe, **fields)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ProtocolError(f"invalid spec {text[:200]!r}: {err}") from err


def send_header(conn: Connection, header: dict[str, Any]) -> None:
    """Send one JSON header."""
    conn.send_bytes(json.dumps(header).encode())


def receive_header(conn: Connection) -> dict[str, Any]:
    """Receive one JSON header.

    Raises:
        EOFError: The other end closed the connection.
        ProtocolError: The message is not a JSON object.
    """
    raw = conn.recv_bytes()
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ProtocolError(f"a header that is not JSON: {raw[:80]!r}") from err
    if not isinstance(header, dict):
        raise ProtocolError(f"a header that is not a JSON object: {raw[:80]!r}")
    return header


def receive_exactly(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from ``sock``.

    Args:
        sock: A blocking socket.
        view: Where the bytes go.
        deadline: ``time.monotonic()`` by which every byte must have arrived; None: no limit.

    Raises:
        EOFError: The other end closed the socket first.
        TimeoutError: The deadline passed first.
    """
    received = 0
    while received < len(view):
        if deadline is not None and not wait([sock], max(deadline - time.monotonic(), 0.0)):
            raise TimeoutError(f"{len(view) - received} of {len(view)} bytes still missing")
        count = sock.recv_into(view[received:])
        if count == 0:
            raise EOFError("the connection closed in the middle of a message")
        received += count


def serve(conn: Connection, sock: socket.socket) -> None:
    """Answer jobs until the service closes its end.

    Args:
        conn: The framed headers.
        sock: The same socket, for the raw payloads.

    Raises:
        ProtocolError: The service sent something else than a job (the worker then exits).
    """
    send_header(conn, {"ready": os.getpid()})
    while True:
        try:
            job = receive_header(conn)
        except (EOFError, ConnectionResetError):
            return
        try:
            size, index = int(job["size"]), int(job["index"])
            spec = spec_from_json(job["spec"])
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"a job header without size, index and spec: {job!r}") from err
        payload = bytearray(size)
        try:
            receive_exactly(sock, memoryview(payload))
        except (EOFError, ConnectionResetError):
            return
        data = bytes(payload)
        del payload
        try:
            prepared = finish(resize_image(data, index, spec), spec.recipe)
        except ServiceError as err:
            error = {"class": type(err).__name__, "message": err.message, "index": err.index}
            send_header(conn, {"error": error})
            continue
        except Exception:  # a bug or a resource failure: the service answers it with a 500
            send_header(conn, {"failed": traceback.format_exc()})
            continue
        finally:
            del data
        ok = {
            "original": list(prepared.original_size),
            "processed": list(prepared.processed_size),
            "decode_s": prepared.decode_s,
            "preprocess_s": prepared.preprocess_s,
            "shape": list(prepared.pixels.shape),
        }
        send_header(conn, {"ok": ok})
        sock.sendall(prepared.pixels.reshape(-1).data)  # (3, H, W) float32, flat


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker on the inherited descriptor named by the first argument.

    Returns:
        0 when the service closed the connection, 2 for a bad command line, 3 when the service
        broke the protocol.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m service.decode_worker FD (started by the service)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    warnings.filterwarnings("ignore", module=r"PIL\.")  # as the service: errors become answers
    fd = int(args[0])
    sock = socket.socket(fileno=os.dup(fd))
    conn = Connection(fd)
    try:
        serve(conn, sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service went away while this worker answered
    except ProtocolError as err:
        print(f"decode worker {os.getpid()}: {err}", file=sys.stderr)
        return 3
    finally:
        conn.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
