"""Decoding in worker processes: the same pixels and errors as in a thread, and crash recovery."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.contract import PreprocessingRecipe
from service import decode_pool, decode_worker
from service.decode_pool import DecodeProcesses, DecodeProcessesStoppedError
from service.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooComplexError,
    ImageTooLargeError,
    NotAnImageError,
    NotReadyError,
    ServiceError,
    TooManyTokensError,
)
from service.prepare import PrepareSpec, prepare_image
from tests.service.conftest import encode, gradient_rgb, jpeg_bytes, png_bytes, wait_for

RECIPE = PreprocessingRecipe(resolution=32, resize_size=37)
# A worker whose resize_image misbehaves for chosen image indexes: 97 ends the process the first
# time (it leaves a marker file), 98 ends it every time (and, with DINO_TEST_FAIL_THIRD_START,
# no third worker starts after two such ends), 99 raises a server-side error, 96 answers pixels
# of another shape than the size it reports, 95 never answers (it sleeps for an hour) and 94
# answers after 0.3 s, 93 ends the process the first time and never answers the second, 92
# sends its answer's header but not its pixels, 91 sends its pixels in four pieces 50 ms apart
# (a reader sees partial reads), 90 sends part of its answer's header and stops, 89 announces a
# header longer than the protocol allows. A file over 4 MB is never read (the worker stops
# reading its socket).
# Other indexes run the real code.
INSTRUMENTED = (
    "import os, socket, struct, sys, time\n"
    "import numpy as np\n"
    "import service.decode_worker as worker\n"
    "from service.prepare import Resized\n"
    "marker = os.environ['DINO_TEST_CRASH_MARKER']\n"
    "ends = marker + '.98'\n"
    "if os.environ.get('DINO_TEST_FAIL_THIRD_START') and os.path.exists(ends) "
    "and len(open(ends).read()) >= 2:\n"
    "    sys.exit(5)\n"
    "real = worker.resize_image\n"
    "real_send = worker.send_header\n"
    "stall, pieces, cut, long = [], [], [], []\n"
    "def send_header(sock, header):\n"
    "    if cut and 'ok' in header:\n"
    "        sock.sendall(struct.pack('!I', 500) + b'{\"ok\": {')\n"
    "        time.sleep(3600)\n"
    "    if long and 'ok' in header:\n"
    "        sock.sendall(struct.pack('!I', 2**31))\n"
    "    real_send(sock, header)\n"
    "    if stall and 'ok' in header:\n"
    "        time.sleep(3600)\n"
    "worker.send_header = send_header\n"
    "real_sendall = socket.socket.sendall\n"
    "def sendall(sock, data):\n"
    "    if not pieces or len(data) < 1000:\n"
    "        return real_sendall(sock, data)\n"
    "    pieces.clear()\n"
    "    view = memoryview(data).cast('B')\n"
    "    step = -(-len(view) // 4)\n"
    "    for start in range(0, len(view), step):\n"
    "        real_sendall(sock, view[start:start + step])\n"
    "        time.sleep(0.05)\n"
    "socket.socket.sendall = sendall\n"
    "real_receive = worker.receive_exactly\n"
    "def receive_exactly(sock, view, deadline=None):\n"
    "    if len(view) > 4_000_000:\n"
    "        time.sleep(3600)\n"
    "    return real_receive(sock, view, deadline)\n"
    "worker.receive_exactly = receive_exactly\n"
    "def resize_image(data, index, spec):\n"
    "    if index == 92:\n"
    "        stall.append(index)\n"
    "    if index == 91:\n"
    "        pieces.append(index)\n"
    "    if index == 90:\n"
    "        cut.append(index)\n"
    "    if index == 89:\n"
    "        long.append(index)\n"
    "    if index == 95:\n"
    "        time.sleep(3600)\n"
    "    if index == 93:\n"
    "        if not os.path.exists(marker):\n"
    "            open(marker, 'w').close()\n"
    "            os._exit(7)\n"
    "        time.sleep(3600)\n"
    "    if index == 94:\n"
    "        time.sleep(0.3)\n"
    "    if index == 97 and not os.path.exists(marker):\n"
    "        open(marker, 'w').close()\n"
    "        os._exit(7)\n"
    "    if index == 98:\n"
    "        with open(ends, 'a') as f:\n"
    "            f.write('x')\n"
    "        os._exit(9)\n"
    "    if index == 99:\n"
    "        raise ValueError('a bug in the decoder')\n"
    "    if index == 96:\n"
    "        return Resized(np.zeros((2, 2, 3), np.uint8), (40, 30), (32, 32), 0.0, 0.0)\n"
    "    return real(data, index, spec)\n"
    "worker.resize_image = resize_image\n"
    "sys.exit(worker.main())\n"
)


def spec(**overrides: object) -> PrepareSpec:
    values: dict[str, object] = {
        "recipe": RECIPE,
        "resolution": 32,
        "crop": "center",
        "patch_size": 8,
        "num_heads": 2,
        "max_side": 256,
        "max_image_pixels": 40_000_000,
        "jpeg_draft": False,
        "max_attention_bytes": 2**30,
    }
    values.update(overrides)
    return PrepareSpec(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodeProcesses]:
    processes = DecodeProcesses(2)
    processes.start()
    yield processes
    processes.close()


@pytest.fixture
def instrumented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[DecodeProcesses]:
    """One instrumented worker; ``@pytest.mark.parametrize("instrumented", [T], indirect=True)``
    sets the pool's ``timeout_s`` (default None)."""
    monkeypatch.setenv("DINO_TEST_CRASH_MARKER", str(tmp_path / "crashed-once"))
    restarts: list[int] = []
    processes = DecodeProcesses(
        1,
        command=(sys.executable, "-c", INSTRUMENTED),
        timeout_s=getattr(request, "param", None),
        on_restart=lambda: restarts.append(1),
    )
    processes.start()
    yield processes
    processes.close()
    assert len(restarts) == processes.restarts


def images() -> list[bytes]:
    rgba = Image.fromarray(gradient_rgb(50, 40, seed=3)).convert("RGBA")
    rotated = Image.fromarray(gradient_rgb(64, 36, seed=4))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise
    palette = Image.fromarray(gradient_rgb(30, 30, seed=5)).convert("P")
    return [
        jpeg_bytes(400, 300, seed=1),
        png_bytes(33, 91, seed=2),
        encode(rgba, "PNG"),
        encode(rotated, "JPEG", exif=exif.tobytes()),
        encode(palette, "GIF"),
        encode(Image.fromarray(gradient_rgb(20, 60, seed=6)), "WEBP", lossless=True),
    ]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"crop": "none"}, {"crop": "none", "resolution": 48}, {"jpeg_draft": True}],
    ids=["center", "none", "none-48", "draft"],
)
def test_pixels_and_sizes_are_those_of_a_decode_in_this_thread(
    pool: DecodeProcesses, overrides: dict[str, object]
) -> None:
    settings = spec(**overrides)
    for index, data in enumerate(images()):
        here = prepare_image(data, index, settings)
        there = pool.prepare(data, index, settings)
        assert there.pixels.dtype == np.float32 and there.pixels.flags.c_contiguous
        np.testing.assert_array_equal(there.pixels, here.pixels)  # bit-identical
        assert (there.original_size, there.processed_size) == (
            here.original_size,
            here.processed_size,
        )
        assert there.decode_s > 0 and there.preprocess_s > 0


def test_client_errors_are_the_same_class_message_and_index(pool: DecodeProcesses) -> None:
    cases: list[tuple[bytes, PrepareSpec, type[ServiceError]]] = [
        (b"", spec(), EmptyImageError),
        (b"not an image at all", spec(), NotAnImageError),
        (png_bytes(40, 30)[:60], spec(), CorruptImageError),
        (png_bytes(200, 100), spec(max_image_pixels=10_000), ImageTooLargeError),
        (png_bytes(200, 100), spec(crop="none", max_attention_bytes=1000), TooManyTokensError),
    ]
    for index, (data, settings, expected) in enumerate(cases, start=3):
        with pytest.raises(expected) as here:
            prepare_image(data, index, settings)
        with pytest.raises(expected) as there:
            pool.prepare(data, index, settings)
        assert type(there.value) is expected
        assert (there.value.message, there.value.index) == (here.value.message, index)
    assert pool.prepare(png_bytes(), 0, spec()).processed_size == (32, 32)  # still serving
    assert pool.restarts == 0


def test_a_worker_killed_while_idle_is_replaced_without_blaming_the_next_image() -> None:
    processes = DecodeProcesses(1)
    processes.start()
    try:
        (first,) = processes.pids()
        os.kill(first, signal.SIGKILL)
        _wait_until_gone(first)
        result = processes.prepare(jpeg_bytes(80, 60), 0, spec())
        np.testing.assert_array_equal(
            result.pixels, prepare_image(jpeg_bytes(80, 60), 0, spec()).pixels
        )
        assert processes.restarts == 1
        assert processes.pids() != [first] and len(processes.pids()) == 1
    finally:
        processes.close()


def test_an_image_that_ends_its_worker_once_is_tried_again(
    instrumented: DecodeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    before = instrumented.pids()
    with caplog.at_level(logging.WARNING, logger="service.decode_pool"):
        result = instrumented.prepare(png_bytes(), 97, spec())
    np.testing.assert_array_equal(result.pixels, prepare_image(png_bytes(), 97, spec()).pixels)
    assert instrumented.restarts == 1
    assert instrumented.pids() != before
    assert "exit status 7" in caplog.text and "image 97" in caplog.text


def test_an_image_that_ends_two_workers_is_refused_and_the_pool_goes_on(
    instrumented: DecodeProcesses,
) -> None:
    with pytest.raises(CorruptImageError) as err:
        instrumented.prepare(png_bytes(), 98, spec())
    assert err.value.index == 98 and "ended the decode process twice" in err.value.message
    assert instrumented.restarts == 2
    assert instrumented.prepare(png_bytes(), 0, spec()).processed_size == (32, 32)


def test_a_server_side_failure_in_a_worker_is_a_logged_runtime_error(
    instrumented: DecodeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="service.decode_pool"),
        pytest.raises(RuntimeError, match="failed on image 99"),
    ):
        instrumented.prepare(png_bytes(), 99, spec())
    assert "ValueError: a bug in the decoder" in caplog.text  # the worker's traceback
    assert instrumented.restarts == 0  # the worker lives on
    assert instrumented.prepare(png_bytes(), 0, spec()).processed_size == (32, 32)


def test_close_ends_every_worker_and_later_images_fail_cleanly() -> None:
    processes = DecodeProcesses(2)
    processes.start()
    pids = processes.pids()
    assert len(pids) == 2
    processes.close()
    for pid in pids:
        _wait_until_gone(pid)
    with pytest.raises(DecodeProcessesStoppedError):
        processes.prepare(png_bytes(), 0, spec())


def test_a_worker_that_cannot_start_fails_the_start_and_leaves_nothing_running() -> None:
    failing = DecodeProcesses(2, command=(sys.executable, "-c", "import sys; sys.exit(5)"))
    with pytest.raises(RuntimeError, match="exit status 5"):
        failing.start()
    assert failing.pids() == []
    silent = DecodeProcesses(
        1, command=(sys.executable, "-c", "import time; time.sleep(30)"), start_timeout_s=0.5
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start within 0.5 s"):
        silent.start()
    assert time.monotonic() - started < 10  # the silent process was killed, not awaited


@pytest.mark.parametrize("error", [OSError("no such file"), ValueError("embedded null byte")])
def test_a_worker_that_cannot_be_spawned_leaves_no_descriptor_open(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(decode_pool.subprocess, "Popen", refuse)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(type(error)):
        decode_pool._Worker((sys.executable, "-c", "pass"), 5.0)
    assert set(os.listdir("/proc/self/fd")) == before  # both ends of the socket pair closed


def test_the_worker_refuses_a_command_line_without_a_descriptor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert decode_worker.main([]) == 2
    assert decode_worker.main(["not-a-number"]) == 2
    assert "started by the service" in capsys.readouterr().err


def test_the_worker_exits_when_the_service_closes_its_end() -> None:
    processes = DecodeProcesses(1)
    processes.start()
    (pid,) = processes.pids()
    worker = next(iter(processes._workers))
    worker.sock.close()
    assert worker.process.wait(timeout=10) == 0  # left by itself, status 0
    _wait_until_gone(pid)
    processes.close()


def _wait_until_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        status = Path(f"/proc/{pid}/stat")
        if status.exists() and ") Z " in status.read_text():  # a zombie: ended, not reaped
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} is still running")


def test_an_image_that_is_not_rgb_in_the_worker_matches_too(pool: DecodeProcesses) -> None:
    cmyk = Image.fromarray(gradient_rgb(45, 35, seed=8)).convert("CMYK")
    sixteen = Image.fromarray(gradient_rgb(30, 20, seed=9)[..., 0].astype(np.uint16) * 257)
    for data in (encode(cmyk, "JPEG"), encode(sixteen, "PNG")):
        here = prepare_image(data, 0, spec())
        np.testing.assert_array_equal(pool.prepare(data, 0, spec()).pixels, here.pixels)


def test_a_worker_that_died_while_idle_does_not_use_up_the_next_images_retry(
    instrumented: DecodeProcesses,
) -> None:
    (worker,) = instrumented._workers
    os.kill(worker.pid, signal.SIGKILL)
    # until the pool can tell (a dead process may show as a zombie before it can be reaped)
    wait_for(lambda: worker.process.poll() is not None)
    result = instrumented.prepare(png_bytes(), 97, spec())  # ends one fresh worker, then passes
    assert result.processed_size == (32, 32)
    assert instrumented.restarts == 2  # the idle death and image 97's one crash


def test_a_reply_cut_short_on_the_service_side_retires_the_worker(
    pool: DecodeProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pixels left unread in the socket must never be read as the next header."""
    real = decode_pool._Worker._receive_pixels
    calls: list[int] = []

    def fail_once(
        self: decode_pool._Worker, ok: Any, settings: PrepareSpec, deadline: float | None
    ) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for the pixels")
        return real(self, ok, settings, deadline)

    monkeypatch.setattr(decode_pool._Worker, "_receive_pixels", fail_once)
    restarts = pool.restarts
    data = jpeg_bytes(400, 300, seed=1)
    with pytest.raises(MemoryError):
        pool.prepare(data, 0, spec())
    assert pool.restarts == restarts + 1  # replaced, not reused
    for _ in range(2 * pool.count):  # every worker answers the next images correctly
        result = pool.prepare(data, 0, spec())
        np.testing.assert_array_equal(result.pixels, prepare_image(data, 0, spec()).pixels)


def test_pixels_of_another_shape_than_announced_retire_the_worker(
    instrumented: DecodeProcesses,
) -> None:
    with pytest.raises(CorruptImageError):  # twice out of protocol: refused like a crash
        instrumented.prepare(png_bytes(), 96, spec())
    assert instrumented.restarts == 2
    assert instrumented.prepare(png_bytes(), 0, spec()).processed_size == (32, 32)


def test_the_image_that_ends_two_workers_is_refused_even_if_no_third_starts(
    instrumented: DecodeProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DINO_TEST_FAIL_THIRD_START", "1")
    with pytest.raises(CorruptImageError):
        instrumented.prepare(png_bytes(), 98, spec())
    assert instrumented.restarts == 1  # the third start failed: not counted
    assert instrumented.pids() == []
    started = time.monotonic()
    with pytest.raises(NotReadyError):  # within the back-off: at once, without a start
        instrumented.prepare(png_bytes(), 0, spec())
    assert time.monotonic() - started < 1.0


def test_a_worker_that_cannot_be_restarted_gives_503s_then_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode_pool, "RESTART_BACKOFF_S", 2.0)
    processes = DecodeProcesses(1)
    processes.start()
    try:
        (pid,) = processes.pids()
        command = processes._command
        processes._command = (sys.executable, "-c", "import sys; sys.exit(5)")
        spawn, attempts = processes._spawn, []

        def counted() -> Any:
            attempts.append(1)
            return spawn()

        monkeypatch.setattr(processes, "_spawn", counted)
        os.kill(pid, signal.SIGKILL)
        _wait_until_gone(pid)
        with pytest.raises(NotReadyError, match="could not be restarted"):
            processes.prepare(png_bytes(), 0, spec())
        failed = time.monotonic()  # after the back-off's clock started
        assert len(attempts) == 1
        with pytest.raises(NotReadyError):
            processes.prepare(png_bytes(), 0, spec())
        assert len(attempts) == 1  # no new attempt within the back-off
        assert processes.restarts == 0
        processes._command = command
        time.sleep(max(0.0, failed + 2.1 - time.monotonic()))
        assert processes.prepare(png_bytes(), 0, spec()).processed_size == (32, 32)
        assert processes.restarts == 1 and len(processes.pids()) == 1
    finally:
        processes.close()


def test_close_while_images_are_in_the_workers_fails_them_cleanly_and_quickly() -> None:
    processes = DecodeProcesses(2)
    processes.start()
    pids = processes.pids()
    big = png_bytes(2000, 1500, seed=7)  # long enough to be inside a worker at close()
    futures = [
        processes.threads.submit(functools.partial(processes.prepare, big, i, spec()))
        for i in range(12)
    ]
    time.sleep(0.3)
    started = time.monotonic()
    processes.close()
    assert time.monotonic() - started < 3.0  # killed together, not waited for one by one
    for future in futures:
        with contextlib.suppress(DecodeProcessesStoppedError, CancelledError):
            future.result(timeout=10)  # else stopped in a worker, or never started
    for pid in pids:
        _wait_until_gone(pid)


def test_the_spec_travels_as_json_and_comes_back_equal() -> None:
    for settings in (spec(), spec(crop="none", jpeg_draft=True, resolution=48)):
        text = decode_worker.spec_to_json(settings)
        assert decode_worker.spec_from_json(text) == settings
    with pytest.raises(decode_worker.ProtocolError):
        decode_worker.spec_from_json('{"recipe": {}}')


def test_a_reply_without_a_whole_original_size_retires_the_worker_and_retries(
    pool: DecodeProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def receive(sock: Any, deadline: float | None = None) -> dict[str, Any]:
        header = decode_worker.receive_header(sock, deadline)  # the first "ok": a one-number size
        if "ok" in header and not seen:
            seen.append(1)
            header["ok"]["original"] = [1]
        return header

    monkeypatch.setattr(decode_pool, "receive_header", receive)
    restarts = pool.restarts
    data = png_bytes(50, 40, seed=4)
    result = pool.prepare(data, 0, spec())  # out of protocol: a new worker, the image again
    np.testing.assert_array_equal(result.pixels, prepare_image(data, 0, spec()).pixels)
    assert pool.restarts == restarts + 1


def test_a_start_that_fails_half_way_closes_the_workers_that_did_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "first"
    one_starts = (  # the first process to get here runs the real worker, the other exits 5
        "import os, sys\n"
        f"try:\n    os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL))\n"
        "except FileExistsError:\n    sys.exit(5)\n"
        "import service.decode_worker as worker\n"
        "sys.exit(worker.main())\n"
    )
    processes = DecodeProcesses(2, command=(sys.executable, "-c", one_starts))
    started: list[decode_pool._Worker] = []
    real = decode_pool.DecodeProcesses._spawn

    def spawn(self: DecodeProcesses) -> decode_pool._Worker:
        worker = real(self)
        started.append(worker)
        return worker

    monkeypatch.setattr(decode_pool.DecodeProcesses, "_spawn", spawn)
    with pytest.raises(RuntimeError, match="exit status 5"):
        processes.start()
    (worker,) = started
    assert worker.process.poll() is not None
    assert worker.sock.fileno() == -1  # closed, not left to the garbage collector
    assert processes.pids() == []


@pytest.mark.timeout(60)  # a limit not applied would hang for the worker's hour
@pytest.mark.parametrize("instrumented", [1.0], indirect=True)
def test_an_image_over_the_time_limit_kills_its_worker_and_is_refused(
    instrumented: DecodeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    (hung,) = instrumented.pids()
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="service.decode_pool"),
        pytest.raises(ImageTooComplexError, match="longer than 1 s") as caught,
    ):  # the limit, not the worker's hour (a TimeoutError here: no limit applied)
        instrumented.threads.submit(
            functools.partial(instrumented.prepare, data, 95, spec())
        ).result(timeout=20)
    assert caught.value.index == 95 and caught.value.status == 422
    assert time.monotonic() - started < 10
    assert f"decode process {hung} was killed: image 95" in caplog.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text  # the kill; its replacement is only information
    with pytest.raises(ProcessLookupError):  # killed, and reaped by the replacement
        os.kill(hung, 0)
    assert instrumented.restarts == 1 and instrumented.pids() != [hung]
    # not retried; the replacement serves the next images, one that is slow within the limit too
    for index in (0, 94):
        got = instrumented.prepare(data, index, spec())
        assert np.array_equal(got.pixels, prepare_image(data, index, spec()).pixels)
    assert instrumented.restarts == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("instrumented", [1.0], indirect=True)
def test_a_retried_image_is_held_to_the_time_limit_too(instrumented: DecodeProcesses) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    with pytest.raises(ImageTooComplexError) as caught:  # ends one worker, hangs the next
        instrumented.threads.submit(
            functools.partial(instrumented.prepare, data, 93, spec())
        ).result(timeout=30)
    assert caught.value.index == 93
    assert instrumented.restarts == 2  # after the crash, and after the kill
    got = instrumented.prepare(data, 0, spec())
    assert np.array_equal(got.pixels, prepare_image(data, 0, spec()).pixels)
    assert instrumented.restarts == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("instrumented", [1.0], indirect=True)
def test_pixels_that_stop_arriving_count_against_the_time_limit(
    instrumented: DecodeProcesses,
) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    with pytest.raises(ImageTooComplexError) as caught:  # the header came, the pixels never
        instrumented.threads.submit(
            functools.partial(instrumented.prepare, data, 92, spec())
        ).result(timeout=20)
    assert caught.value.index == 92 and instrumented.restarts == 1
    got = instrumented.prepare(data, 0, spec())  # nothing of the stalled answer is left over
    assert np.array_equal(got.pixels, prepare_image(data, 0, spec()).pixels)


@pytest.mark.parametrize("instrumented", [None], indirect=True)
def test_without_a_time_limit_a_slow_image_is_waited_for(instrumented: DecodeProcesses) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    got = instrumented.prepare(data, 94, spec())
    assert np.array_equal(got.pixels, prepare_image(data, 94, spec()).pixels)
    assert instrumented.timeout_s is None and instrumented.restarts == 0


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf"), 86_401.0])
def test_a_time_limit_must_be_positive_and_at_most_a_day(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        DecodeProcesses(1, timeout_s=timeout_s)


@pytest.mark.timeout(60)  # a reader that lost its place would wait for bytes that never come
@pytest.mark.parametrize("instrumented", [None], indirect=True)
def test_pixels_that_arrive_in_pieces_are_read_whole_and_the_next_answer_too(
    instrumented: DecodeProcesses,
) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    expected = prepare_image(data, 0, spec()).pixels
    np.testing.assert_array_equal(instrumented.prepare(data, 91, spec()).pixels, expected)
    np.testing.assert_array_equal(instrumented.prepare(data, 0, spec()).pixels, expected)
    assert instrumented.restarts == 0  # nothing out of protocol: the same worker goes on


@pytest.mark.timeout(60)
@pytest.mark.parametrize("instrumented", [1.0], indirect=True)
def test_a_header_cut_short_counts_against_the_time_limit(instrumented: DecodeProcesses) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    started = time.monotonic()
    with pytest.raises(ImageTooComplexError) as caught:
        instrumented.prepare(data, 90, spec())
    assert caught.value.index == 90 and time.monotonic() - started < 10
    assert instrumented.restarts == 1
    got = instrumented.prepare(data, 0, spec())
    np.testing.assert_array_equal(got.pixels, prepare_image(data, 0, spec()).pixels)


@pytest.mark.timeout(60)  # without the length limit: 2 GiB allocated, then a wait for them
@pytest.mark.parametrize("instrumented", [None], indirect=True)
def test_a_header_longer_than_the_protocol_allows_retires_the_worker_at_once(
    instrumented: DecodeProcesses,
) -> None:
    data = jpeg_bytes(40, 30, seed=1)
    with pytest.raises(CorruptImageError, match="ended the decode process twice") as caught:
        instrumented.prepare(data, 89, spec())
    assert caught.value.index == 89 and instrumented.restarts == 2
    got = instrumented.prepare(data, 0, spec())
    np.testing.assert_array_equal(got.pixels, prepare_image(data, 0, spec()).pixels)


def test_receive_exactly_fills_a_float32_buffer_from_partial_reads() -> None:
    ours, theirs = socket.socketpair()
    expected = np.arange(3 * 40 * 30, dtype=np.float32).reshape(3, 40, 30)

    def send() -> None:
        for piece in np.array_split(expected.reshape(-1).view(np.uint8), 5):
            theirs.sendall(piece.tobytes())
            time.sleep(0.02)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = np.zeros_like(expected)
        decode_worker.receive_exactly(ours, got.data, time.monotonic() + 10)
        np.testing.assert_array_equal(got, expected)
        theirs.sendall(b"x")  # and not a byte more was taken
        assert ours.recv(10) == b"x"
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_headers_are_framed_limited_and_waited_for_only_until_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    try:
        decode_worker.send_header(theirs, {"ok": {"shape": [3, 2, 2]}, "text": "é"})
        assert decode_worker.receive_header(ours, time.monotonic() + 5) == {
            "ok": {"shape": [3, 2, 2]},
            "text": "é",
        }
        with pytest.raises(ValueError, match="over the limit"):
            decode_worker.send_header(theirs, {"failed": "x" * decode_worker.MAX_HEADER_BYTES})
        theirs.sendall(struct.pack("!I", decode_worker.MAX_HEADER_BYTES + 1))
        with pytest.raises(decode_worker.ProtocolError, match="over the limit"):
            decode_worker.receive_header(ours)  # no deadline: refused, not waited for
        theirs.sendall(struct.pack("!I", 2) + b"[]")
        with pytest.raises(decode_worker.ProtocolError, match="not a JSON object"):
            decode_worker.receive_header(ours)
        theirs.sendall(struct.pack("!I", 3) + b"{no")
        with pytest.raises(decode_worker.ProtocolError, match="not JSON"):
            decode_worker.receive_header(ours)
        theirs.sendall(struct.pack("!I", 100) + b'{"ok"')
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="95 of 100 bytes still missing"):
            decode_worker.receive_header(ours, time.monotonic() + 0.2)
        assert time.monotonic() - started < 5
        theirs.close()
        with pytest.raises(EOFError):
            decode_worker.receive_header(ours)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.timeout(60)  # without a limit on sending, the service would wait for the hour
@pytest.mark.parametrize("instrumented", [1.0], indirect=True)
def test_a_worker_that_stops_reading_the_file_counts_against_the_time_limit(
    instrumented: DecodeProcesses,
) -> None:
    data = png_bytes()[:16] + os.urandom(8 << 20)  # more than the socket's buffers hold
    started = time.monotonic()
    with pytest.raises(ImageTooComplexError) as caught:
        instrumented.prepare(data, 7, spec())
    assert caught.value.index == 7 and time.monotonic() - started < 10
    assert instrumented.restarts == 1
    small = jpeg_bytes(40, 30, seed=1)
    got = instrumented.prepare(small, 0, spec())  # the socket is blocking again, and in step
    np.testing.assert_array_equal(got.pixels, prepare_image(small, 0, spec()).pixels)
