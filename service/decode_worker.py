"""``python -m service.decode_worker FD``: one decode process of ``DINO_DECODE_PROCESSES``.

The service starts it with one end of a socket pair as file descriptor ``FD``. Each message is a
JSON header (its length as 4 bytes, big-endian, then the UTF-8 text; at most
:data:`MAX_HEADER_BYTES`), sometimes followed by a raw payload whose size the header gives:

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
can only fail to parse, and the length limit keeps such a misread from waiting for bytes that
never come. The payloads are not copied into the framing, and the GIL is free while
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
import struct
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from multiprocessing.connection import wait
from typing import Any

from models.contract import PreprocessingRecipe
from service.errors import ServiceError
from service.prepare import PrepareSpec, finish, resize_image

MAX_HEADER_BYTES = 1 << 20
"""Longest header either side accepts (a worker's traceback is cut well below it)."""
_MAX_TRACEBACK_CHARS = 50_000  # at most 6 bytes each once escaped as JSON
_LENGTH = struct.Struct("!I")


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


def send_header(sock: socket.socket, header: dict[str, Any]) -> None:
    """Send one JSON header (with its length in front)."""
    text = json.dumps(header).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"a header of {len(text)} bytes, over the limit of {MAX_HEADER_BYTES}")
    sock.sendall(_LENGTH.pack(len(text)) + text)


def receive_header(sock: socket.socket, deadline: float | None = None) -> dict[str, Any]:
    """Receive one JSON header.

    Args:
        sock: A blocking socket.
        deadline: ``time.monotonic()`` by which the whole header must have arrived; None: no
            limit.

    Raises:
        EOFError: The other end closed the connection.
        TimeoutError: The deadline passed first.
        ProtocolError: A length over :data:`MAX_HEADER_BYTES`, or a message that is not a JSON
            object.
    """
    prefix = bytearray(_LENGTH.size)
    receive_exactly(sock, memoryview(prefix), deadline)
    (size,) = _LENGTH.unpack(prefix)
    if size > MAX_HEADER_BYTES:
        raise ProtocolError(f"a header of {size} bytes, over the limit of {MAX_HEADER_BYTES}")
    raw = bytearray(size)
    receive_exactly(sock, memoryview(raw), deadline)
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ProtocolError(f"a header that is not JSON: {bytes(raw[:80])!r}") from err
    if not isinstance(header, dict):
        raise ProtocolError(f"a header that is not a JSON object: {bytes(raw[:80])!r}")
    return header


def receive_exactly(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` (any C-contiguous buffer, counted in bytes) from ``sock``.

    Args:
        sock: A blocking socket.
        view: Where the bytes go.
        deadline: ``time.monotonic()`` by which every byte must have arrived; None: no limit.

    Raises:
        EOFError: The other end closed the socket first.
        TimeoutError: The deadline passed first.
    """
    target = view.cast("B")  # a float32 view counts items, and recv_into returns bytes
    received = 0
    while received < len(target):
        if deadline is not None and not wait([sock], max(deadline - time.monotonic(), 0.0)):
            missing = len(target) - received
            raise TimeoutError(f"{missing} of {len(target)} bytes still missing")
        count = sock.recv_into(target[received:])
        if count == 0:
            raise EOFError("the connection closed in the middle of a message")
        received += count


def serve(sock: socket.socket) -> None:
    """Answer jobs until the service closes its end.

    Args:
        sock: The worker's end of the socket pair.

    Raises:
        ProtocolError: The service sent something else than a job (the worker then exits).
    """
    send_header(sock, {"ready": os.getpid()})
    while True:
        try:
            job = receive_header(sock)
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
            send_header(sock, {"error": error})
            continue
        except Exception:  # a bug or a resource failure: the service answers it with a 500
            text = traceback.format_exc()
            if len(text) > _MAX_TRACEBACK_CHARS:  # its end says the most
                text = "...\n" + text[-_MAX_TRACEBACK_CHARS:]
            send_header(sock, {"failed": text})
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
        send_header(sock, {"ok": ok})
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
    sock = socket.socket(fileno=int(args[0]))
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service went away while this worker answered
    except ProtocolError as err:
        print(f"decode worker {os.getpid()}: {err}", file=sys.stderr)
        return 3
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
