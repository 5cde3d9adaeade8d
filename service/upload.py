"""Request body -> image bytes and raw option values, within the body limits.

Accepted bodies: ``multipart/form-data`` with one or more file parts named ``images`` and
option fields, or a raw ``image/*`` body holding one image. Options may also come from the
query string. Parts are kept in memory (the body limit bounds them); nothing is fetched from
URLs.

Bodies are read before a request is admitted to the batcher, so reading is bounded too: every
request's body bytes are reserved in a shared :class:`BodyBudget` chunk by chunk as they arrive
(a declared ``Content-Length`` alone reserves nothing, so idle connections that only announce
large bodies hold no budget) for the request's whole life, a request that would overdraw it is
refused with 429, and a body that takes longer than the read timeout is
refused with 408. Multipart parts are counted while they are parsed, and parsing stops at the
first part beyond what the limits allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    BodyTooLargeError,
    ClientDisconnectedError,
    InvalidOptionError,
    MalformedRequestError,
    NoImagesError,
    OverloadedError,
    RequestTimeoutError,
    TooManyImagesError,
    TooManyPartsError,
    UnsupportedContentEncodingError,
    UnsupportedMediaTypeError,
)
from service.options import OPTION_NAMES

logger = logging.getLogger(__name__)

IMAGE_FIELD = "images"
OPTION_PART_SLACK = 4
"""Option parts allowed beyond one per option name (``outputs`` may be repeated)."""
_MAX_TEXT_FIELD = 1024
MAX_TRANSPORT_PADDING = 64
"""Most spaces and tabs allowed after a boundary delimiter (RFC 2046 transport padding)."""
_PADDING = re.compile(rb"[ \t]+")


@dataclass
class Upload:
    """What a request carried."""

    images: list[bytes] = field(default_factory=list)
    options: dict[str, list[str]] = field(default_factory=dict)


class BodyBudget:
    """Bytes of request bodies held in memory at once, across requests.

    Args:
        capacity: Most bytes reserved at once.
        retry_after_s: ``Retry-After`` sent when a reservation is refused.
        on_change: Called with the bytes in use after every change (for a gauge).
    """

    def __init__(
        self,
        capacity: int,
        retry_after_s: int,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.used = 0
        self._on_change = on_change

    def _add(self, delta: int) -> None:
        self.used += delta
        if self._on_change is not None:
            self._on_change(self.used)

    @contextlib.contextmanager
    def reservation(self) -> Iterator[Reservation]:
        """A reservation that grows while a body is read and is released on exit."""
        held = Reservation(self)
        try:
            yield held
        finally:
            self._add(-held.bytes)
            held.bytes = 0


class Reservation:
    """One request's share of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def reserve(self, total: int) -> None:
        """Hold at least ``total`` bytes.

        Raises:
            OverloadedError: The budget cannot cover it now.
        """
        extra = total - self.bytes
        if extra <= 0:
            return
        budget = self._budget
        if budget.used + extra > budget.capacity:
            raise OverloadedError(
                f"the service is reading too many request bodies at once ({budget.used} of "
                f"{budget.capacity} bytes held); retry in {budget.retry_after_s} s",
                retry_after_s=budget.retry_after_s,
                body_unread=True,
            )
        budget._add(extra)
        self.bytes = total


async def read_body(
    request: Request, *, max_bytes: int, reservation: Reservation, timeout_s: float
) -> bytes:
    """Read the body within the size limit, the shared budget and the read timeout.

    Args:
        request: The request.
        max_bytes: Largest body accepted.
        reservation: This request's share of the body budget; it grows as bytes arrive.
        timeout_s: Longest the whole body may take to arrive.

    Raises:
        BodyTooLargeError: Declared or actual size above the limit.
        MalformedRequestError: An unparsable ``Content-Length``.
        OverloadedError: The body budget is exhausted.
        RequestTimeoutError: The body did not arrive in time.
        ClientDisconnectedError: The client went away before the body was complete.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise MalformedRequestError(f"Content-Length {declared[:40]!r} is not a number")
        size = int(declared)
        if size > max_bytes:
            raise BodyTooLargeError(f"the body has {size} bytes, over the limit of {max_bytes}")
        # Nothing is reserved for the declared size: a client that only announces a large body
        # must not hold the shared budget; bytes are reserved as they arrive.
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_bytes:
                    raise BodyTooLargeError(f"the body exceeds the limit of {max_bytes} bytes")
                reservation.reserve(total)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the body did not arrive within {timeout_s:g} s ({total} bytes received)"
        ) from None
    except ClientDisconnect:
        logger.info("client disconnected after sending %d body bytes", total)
        raise ClientDisconnectedError("the client closed the connection") from None
    return b"".join(chunks)


def media_type(content_type: str) -> str:
    """The lower-cased media type of a ``Content-Type`` header, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def query_options(query: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Query-string pairs as option name -> values, in order."""
    options: dict[str, list[str]] = {}
    for name, value in query:
        options.setdefault(name, []).append(value)
    return options


def check_content_type(content_type: str) -> bytes | None:
    """Check the ``Content-Type`` header before any of the body is read.

    Returns:
        The multipart boundary, or None for a raw ``image/*`` body.

    Raises:
        UnsupportedMediaTypeError: Neither multipart/form-data nor image/*.
        MalformedRequestError: multipart/form-data without a boundary.
    """
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise MalformedRequestError("multipart/form-data without a boundary parameter")
        return bytes(boundary)
    if kind.startswith("image/"):
        return None
    raise UnsupportedMediaTypeError(
        f"Content-Type {kind or '(none)'!r} is not supported; send multipart/form-data with "
        f"'{IMAGE_FIELD}' file fields, or one image with an image/* Content-Type"
    )


def check_content_encoding(content_encoding: str | None) -> None:
    """Refuse a compressed body (any ``Content-Encoding`` but ``identity``) before reading it.

    The service does not decompress bodies (an image is compressed already); read as they are,
    gzip bytes would only be refused later as "not an image", or a mislabelled body accepted.

    Raises:
        UnsupportedContentEncodingError: A content coding other than ``identity`` (415, with
            ``Accept-Encoding: identity``, RFC 9110).
    """
    if content_encoding is None:
        return
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    applied = [c for c in codings if c and c != "identity"]
    if applied:
        shown = content_encoding.strip()
        shown = repr(shown) if len(shown) <= 40 else f"{shown[:40]!r}..."
        raise UnsupportedContentEncodingError(
            f"Content-Encoding {shown} is not supported; send the body uncompressed "
            "(without a Content-Encoding header)"
        )


def max_parts(max_images: int) -> int:
    """Most multipart parts accepted: the images, one per option, and a small slack."""
    return max_images + len(OPTION_NAMES) + OPTION_PART_SLACK


def parse_upload(
    body: bytes,
    *,
    content_type: str,
    query: list[tuple[str, str]],
    max_images: int,
) -> Upload:
    """Split a body into images and options.

    Args:
        body: The whole body.
        content_type: The request's ``Content-Type`` header.
        query: Query-string pairs (options).
        max_images: Most images allowed.

    Raises:
        UnsupportedMediaTypeError: Neither multipart/form-data nor image/*.
        MalformedRequestError: Broken multipart framing (including a missing closing boundary).
        InvalidOptionError: A file part with another name than ``images``, or a huge text field.
        NoImagesError: No image at all.
        TooManyImagesError: More than ``max_images`` (detected while parsing).
        TooManyPartsError: More parts than :func:`max_parts` (detected while parsing).
    """
    upload = Upload()
    upload.options.update(query_options(query))
    boundary = check_content_type(content_type)
    if boundary is not None:
        _parse_multipart(body, boundary, upload, max_images)
    else:
        upload.images.append(body)
    if not upload.images:
        raise NoImagesError(f"the request holds no image; add one or more '{IMAGE_FIELD}' files")
    if len(upload.images) > max_images:
        raise TooManyImagesError(
            f"the request holds {len(upload.images)} images, more than the limit of {max_images}"
        )
    return upload


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_image: bool = False
    data: bytearray = field(default_factory=bytearray)


class _MultipartCollector:
    """Callbacks of the streaming parser: validates each part as soon as it is known."""

    def __init__(self, upload: Upload, max_images: int) -> None:
        self.upload = upload
        self.max_images = max_images
        self.max_parts = max_parts(max_images)
        self.parts = 0
        self.ended = False
        self.part = _Part()
        self.header_name = bytearray()
        self.header_value = bytearray()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise TooManyPartsError(
                f"the multipart body has more than {self.max_parts} parts "
                f"(at most {self.max_images} images plus the options)"
            )
        self.part = _Part()

    # python-multipart bounds part headers itself (8 per part, about 4 KiB per line).
    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value.extend(data[start:end])

    def on_header_end(self) -> None:
        self.part.headers[bytes(self.header_name).lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        part = self.part
        disposition = part.headers.get(b"content-disposition")
        if disposition is None:
            raise MalformedRequestError("a multipart part lacks its Content-Disposition header")
        _, params = parse_options_header(disposition)
        raw_name = params.get(b"name")
        if raw_name is None:
            raise MalformedRequestError("a multipart part lacks its field name")
        part.name = raw_name.decode("utf-8", errors="replace")
        part.is_image = part.name == IMAGE_FIELD
        if part.is_image:
            if len(self.upload.images) >= self.max_images:
                raise TooManyImagesError(
                    f"the request holds more than the limit of {self.max_images} images"
                )
        elif b"filename" in params:
            raise InvalidOptionError(
                f"unexpected file field {part.name!r}; send images as '{IMAGE_FIELD}'"
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.data += memoryview(data)[start:end]  # no intermediate copy of the slice
        if not part.is_image and len(part.data) > _MAX_TEXT_FIELD:
            raise InvalidOptionError(
                f"option field {part.name!r} is longer than {_MAX_TEXT_FIELD} bytes"
            )

    def on_part_end(self) -> None:
        part = self.part
        if part.is_image:
            self.upload.images.append(bytes(part.data))
        else:
            value = part.data.decode("utf-8", errors="replace")
            self.upload.options.setdefault(part.name, []).append(value)
        self.part = _Part()

    def on_end(self) -> None:
        self.ended = True


def _check_delimiters(body: bytes, boundary: bytes, max_images: int) -> None:
    """Refuse a body with more boundary delimiters than its parts can have, before parsing.

    RFC 2046 forbids the delimiter (CRLF, ``--``, boundary) inside a part, so each one starts a
    part or closes the body. The client picks the boundary, and python-multipart walks every
    delimiter that is followed by neither CRLF nor ``--`` byte by byte in Python: a body packed
    with them costs about 100 times the parsing time of a normal one, on the threads that also
    decode everyone's images. Counting them first runs at memory speed.

    Raises:
        TooManyPartsError: More delimiters than :func:`max_parts` parts and the closing one.
        MalformedRequestError: More than :data:`MAX_TRANSPORT_PADDING` spaces or tabs after a
            delimiter.
    """
    limit = max_parts(max_images)
    delimiter = b"--" + boundary
    count = body.count(b"\r\n" + delimiter) + (1 if body.startswith(delimiter) else 0)
    if count > limit + 1:
        raise TooManyPartsError(
            f"the multipart body holds its boundary delimiter {count} times, more than a body "
            f"of at most {limit} parts can (at most {max_images} images plus the options; the "
            "delimiter may not occur inside a part)"
        )
    # The parser also walks the padding after a delimiter byte by byte, however long it is.
    # The delimiters are found with bytes.find (at most ``limit + 1``, counted above): a regex
    # with a leading alternation would try every byte of the body in Python's re engine.
    if _padded_delimiter(body, delimiter):
        raise MalformedRequestError(
            "a multipart boundary delimiter is followed by more than "
            f"{MAX_TRANSPORT_PADDING} bytes of padding (spaces or tabs)"
        )


def _padded_delimiter(body: bytes, delimiter: bytes) -> bool:
    """Whether a delimiter (at the start or after CRLF) is followed by too much padding."""
    run = MAX_TRANSPORT_PADDING + 1

    def padded(at: int) -> bool:
        tail = body[at : at + run]
        return len(tail) == run and not tail.strip(b" \t")

    if body.startswith(delimiter) and padded(len(delimiter)):
        return True
    marker = b"\r\n" + delimiter
    found = body.find(marker)
    while found >= 0:
        if padded(found + len(marker)):
            return True
        found = body.find(marker, found + 1)
    return False


def _parse_multipart(body: bytes, boundary: bytes, upload: Upload, max_images: int) -> None:
    _check_delimiters(body, boundary, max_images)
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        # RFC 2046 allows a preamble before the first delimiter, to be ignored; the parser
        # does not skip one itself.
        first = body.find(b"\r\n" + delimiter)
        if first >= 0:
            body = body[first + 2 :]
    # Nor does it take transport padding after the first delimiter (after the others it does).
    padding = _PADDING.match(body, len(delimiter))
    if padding is not None and body.startswith(delimiter):
        body = delimiter + body[padding.end() :]
    collector = _MultipartCollector(upload, max_images)
    try:  # the parser itself refuses some boundaries (longer than 256 bytes, for one)
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": collector.on_part_begin,
                "on_part_data": collector.on_part_data,
                "on_part_end": collector.on_part_end,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
                "on_end": collector.on_end,
            },
        )
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as err:
        raise MalformedRequestError(f"invalid multipart body: {err}") from None
    if not collector.ended:
        raise MalformedRequestError(
            "the multipart body ends without its closing boundary "
            f"('--{boundary.decode('latin-1')}--')"
        )
