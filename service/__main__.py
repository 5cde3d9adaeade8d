"""``python -m service``: read ``DINO_*`` settings and run the server with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.runtime import cuda_unavailable_reason
from service.settings import Settings, misspelt_settings


def _parser() -> argparse.ArgumentParser:
    fields = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        shown = "unset" if default in ("", None) else default
        fields.append(f"  DINO_{name.upper()} (default: {shown})")
    return argparse.ArgumentParser(
        prog="python -m service",
        description="Serve DINO features over HTTP (POST /embed). Every setting is a DINO_* "
        "environment variable; docs/api.md explains each one.",
        epilog="settings:\n" + "\n".join(fields),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, whose stop by SIGTERM ends the process with status 0 at once.

    After its graceful shutdown uvicorn raises the SIGTERM it caught again, for the handler that
    was there before it; with the default one the process died of it (status 143, where 0 is
    documented). Here a handler of ours receives it, and the process exits 0 right after the
    shutdown (requests answered, the app's lifespan closed), instead of waiting for threads that
    cannot be stopped, such as a model load in progress, which a second SIGTERM could not end.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():  # signals are the main thread's
                yield
            return

        def before_uvicorn(_signum: int, _frame: FrameType | None) -> None:
            self.should_exit = True  # a SIGTERM before uvicorn's handler still stops it

        previous = signal.signal(signal.SIGTERM, before_uvicorn)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self.stopped_by == signal.SIGTERM:
            logging.shutdown()  # flush the log before leaving without the interpreter's exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def quiet_client_noise() -> None:
    """Keep the libraries' warnings about a client's bytes out of the log.

    Pillow warns about every odd tag in a user's file and python-multipart about every broken
    delimiter of a body (at WARNING, before it raises); the service already answers real damage
    with a 400 that names it, so these would only let clients flood the log.
    """
    warnings.filterwarnings("ignore", module=r"PIL\.")
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server; returns a process exit status.

    Args:
        argv: Command-line arguments (only ``--help``); default ``sys.argv[1:]``.

    Returns:
        0 after a normal shutdown (SIGTERM), 2 for invalid settings, 3 when the server cannot
        start (``DINO_DEVICE=cuda`` and CUDA cannot be bound, or the port is taken: uvicorn's
        startup-failure status), 130 after Ctrl-C.

    A SIGTERM stops accepting connections, lets the requests in flight finish for at most
    ``DINO_SHUTDOWN_TIMEOUT_S`` (a client that never reads its answer would hold the stop
    forever otherwise), then stops the model's work and exits.
    """
    _parser().parse_args(argv)
    for message in misspelt_settings(os.environ):
        print(f"warning: {message}", file=sys.stderr)
    try:
        settings = Settings()
    except ValidationError as err:
        print(f"invalid DINO_* settings:\n{err}", file=sys.stderr)
        return 2
    if settings.device == "cuda" and (reason := cuda_unavailable_reason()) is not None:
        print(f"error: {reason}", file=sys.stderr)  # before uvicorn: no lifespan traceback
        return 3
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_client_noise()
    fatal: list[str] = []

    def stop_server(reason: str) -> None:  # DINO_DEVICE=cuda and CUDA cannot be bound
        fatal.append(reason)
        server.should_exit = True

    app = create_app(settings, on_fatal=stop_server)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    server = _Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again, which asyncio
        # turns into KeyboardInterrupt: the conventional status, without a traceback.
        return 130
    # The model loads after the server started listening; a device that cannot be bound
    # stops it (stop_server). uvicorn also returns normally when the lifespan startup failed,
    # and exits with its own startup-failure status, 3 as well, when it cannot bind the port.
    return 3 if fatal or not server.started else 0


if __name__ == "__main__":
    sys.exit(main())
