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


@contextlib.contextmanager
def _sigterm_is_a_normal_stop() -> Iterator[None]:
    """After its graceful shutdown uvicorn raises the SIGTERM it caught again, for the handler
    that was there before it; with the default one the process died of it (status 143). Here
    that handler takes note instead, so a stop exits with the documented 0."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's (uvicorn installs none either)
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    # Pillow warns about every odd tag in a user's file; the decoder already turns real damage
    # into 400 answers, so these would only flood the log.
    warnings.filterwarnings("ignore", module=r"PIL\.")
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
    server = uvicorn.Server(config)
    try:
        with _sigterm_is_a_normal_stop():
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
