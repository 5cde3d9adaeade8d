"""Request body -> image bytes and raw option values, within the body-size limit.

Accepted bodies: ``multipart/form-data`` with one or more file parts named ``images`` and
option fields, or a raw ``image/*`` body holding one image. Options may also come from the
query string. Parts are kept in memory (the body limit bounds them); nothing is fetched from
URLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import (
    BodyTooLargeError,
    InvalidOptionError,
    MalformedRequestError,
    NoImagesError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)

IMAGE_FIELD = "images"
_MAX_TEXT_FIELD = 1024


@dataclass
class Upload:
    """What a request carried."""

    images: list[bytes] = field(default_factory=list)
    options: dict[str, list[str]] = field(default_factory=dict)


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """Read the body, refusing it as soon as it exceeds ``max_bytes``.

    Raises:
        BodyTooLargeError: Declared or actual size above the limit.
        MalformedRequestError: An unparsable ``Content-Length``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise MalformedRequestError(f"Content-Length {declared!r} is not a number") from None
        if size > max_bytes:
            raise BodyTooLargeError(f"the body has {size} bytes, over the limit of {max_bytes}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise BodyTooLargeError(f"the body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(content_type: str) -> str:
    """The lower-cased media type of a ``Content-Type`` header, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


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
        MalformedRequestError: Broken multipart framing.
        InvalidOptionError: A file part with another name than ``images``, or a huge text field.
        NoImagesError: No image at all.
        TooManyImagesError: More than ``max_images``.
    """
    upload = Upload()
    for name, value in query:
        upload.options.setdefault(name, []).append(value)
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        _parse_multipart(body, content_type, upload)
    elif kind.startswith("image/"):
        upload.images.append(body)
    else:
        raise UnsupportedMediaTypeError(
            f"Content-Type {kind or '(none)'!r} is not supported; send multipart/form-data with "
            f"'{IMAGE_FIELD}' file fields, or one image with an image/* Content-Type"
        )
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
    data: bytearray = field(default_factory=bytearray)


def _parse_multipart(body: bytes, content_type: str, upload: Upload) -> None:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequestError("multipart/form-data without a boundary parameter")
    parts: list[_Part] = []
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as err:
        raise MalformedRequestError(f"invalid multipart body: {err}") from None
    for part in parts:
        _collect(part, upload)


def _collect(part: _Part, upload: Upload) -> None:
    disposition = part.headers.get(b"content-disposition")
    if disposition is None:
        raise MalformedRequestError("a multipart part lacks its Content-Disposition header")
    _, params = parse_options_header(disposition)
    raw_name = params.get(b"name")
    if raw_name is None:
        raise MalformedRequestError("a multipart part lacks its field name")
    name = raw_name.decode("utf-8", errors="replace")
    if name == IMAGE_FIELD:
        upload.images.append(bytes(part.data))
        return
    if b"filename" in params:
        raise InvalidOptionError(f"unexpected file field {name!r}; send images as '{IMAGE_FIELD}'")
    if len(part.data) > _MAX_TEXT_FIELD:
        raise InvalidOptionError(f"option field {name!r} is longer than {_MAX_TEXT_FIELD} bytes")
    upload.options.setdefault(name, []).append(part.data.decode("utf-8", errors="replace"))
