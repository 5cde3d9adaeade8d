"""Multipart parsing: framing, part and image limits applied while parsing."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from service.__main__ import quiet_client_noise
from service.errors import (
    InvalidOptionError,
    MalformedRequestError,
    NoImagesError,
    TooManyImagesError,
    TooManyPartsError,
)
from service.upload import MAX_TRANSPORT_PADDING, max_parts, parse_upload

BOUNDARY = "B0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def field(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


def parse(body: bytes, max_images: int = 3) -> tuple[list[bytes], dict[str, list[str]]]:
    upload = parse_upload(body, content_type=CONTENT_TYPE, query=[], max_images=max_images)
    return upload.images, upload.options


def test_images_and_options() -> None:
    body = field("images", b"one", "a.png") + field("outputs", b"cls") + field("outputs", b"patch")
    images, options = parse(body + field("images", b"two", "b.png") + END)
    assert images == [b"one", b"two"]
    assert options == {"outputs": ["cls", "patch"]}


def test_missing_closing_boundary_is_malformed() -> None:
    body = field("images", b"one", "a.png")
    with pytest.raises(MalformedRequestError, match="closing boundary"):
        parse(body)
    with pytest.raises(MalformedRequestError, match="closing boundary"):
        parse(body[:-2])  # no CRLF either
    with pytest.raises(MalformedRequestError):
        parse(b"")


def test_well_formed_body_without_parts_has_no_images() -> None:
    with pytest.raises(NoImagesError):
        parse(END)


def test_parts_are_counted_while_parsing() -> None:
    limit = max_parts(3)
    valid = field("outputs", b"cls") * limit + field("images", b"x", "a.png")
    # One part too many and no closing delimiter (so as many delimiters as a valid body has):
    # the parser's own count refuses it.
    with pytest.raises(TooManyPartsError, match=f"more than {limit} parts"):
        parse(valid)
    # Garbage after the limit: the delimiters are counted before parsing.
    with pytest.raises(TooManyPartsError, match=f"at most {limit} parts"):
        parse(valid + b"--" + BOUNDARY.encode() + b"\r\nno disposition\r\n\r\n")
    assert parse(field("outputs", b"cls") * (limit - 1) + field("images", b"x", "a") + END)


def test_a_body_packed_with_delimiters_is_refused_before_parsing() -> None:
    """Delimiters followed by neither CRLF nor -- cost python-multipart a byte-wise walk."""
    delimiter = b"\r\n--" + BOUNDARY.encode()
    packed = field("images", delimiter.lstrip(b"\r\n") + b"-x" + (delimiter + b"-x") * 5000, "a")
    with pytest.raises(TooManyPartsError, match="delimiter 5003 times"):
        parse(packed + END)
    limit = max_parts(3)
    # Exactly as many delimiters as `limit` parts and the closing one: parsed as usual.
    images, options = parse(
        field("outputs", b"cls") * (limit - 1) + field("images", b"x", "a") + END
    )
    assert images == [b"x"] and options == {"outputs": ["cls"] * (limit - 1)}


def test_images_are_counted_while_parsing() -> None:
    four = field("images", b"x", "a.png") * 4
    with pytest.raises(TooManyImagesError):
        parse(four + b"truncated, never parsed")
    images, _ = parse(field("images", b"x", "a.png") * 3 + END)
    assert len(images) == 3


def test_part_headers_and_text_fields_are_bounded() -> None:
    huge_header = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"\r\nX-Big: '.encode()
        + b"a" * 20_000
        + b"\r\n\r\nx\r\n"
        + END
    )
    with pytest.raises(MalformedRequestError, match="header"):
        parse(huge_header)
    with pytest.raises(InvalidOptionError, match="longer than 1024"):
        parse(field("crop", b"x" * 5000) + field("images", b"x", "a") + END)
    with pytest.raises(InvalidOptionError, match="unexpected file field"):
        parse(field("image", b"x", "a.png") + END)


def test_boundary_the_parser_refuses_is_malformed_not_a_crash() -> None:
    long = "b" * 300  # over the multipart parser's 256-byte limit
    body = f'--{long}\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--{long}--\r\n'
    with pytest.raises(MalformedRequestError, match="invalid multipart body"):
        parse_upload(
            body.encode(),
            content_type=f"multipart/form-data; boundary={long}",
            query=[],
            max_images=3,
        )


def test_transport_padding_is_bounded() -> None:
    # RFC 2046 allows spaces and tabs after a delimiter; python-multipart walks them byte by
    # byte in Python, so a body of 60 MB of padding took it about 14 s.
    padding = b" \t" * (MAX_TRANSPORT_PADDING // 2)
    second = field("outputs", b"patch").replace(b"\r\n", padding + b"\r\n", 1)
    images, options = parse(field("images", b"one", "a.png") + second + END)
    assert images == [b"one"] and options == {"outputs": ["patch"]}
    too_long = field("outputs", b"patch").replace(b"\r\n", padding + b" \r\n", 1)
    with pytest.raises(MalformedRequestError, match=f"more than {MAX_TRANSPORT_PADDING} bytes"):
        parse(field("images", b"one", "a.png") + too_long + END)
    # After the first delimiter too (python-multipart itself takes none there).
    first = field("images", b"one", "a.png").replace(b"\r\n", padding + b"\r\n", 1)
    assert parse(first + END) == ([b"one"], {})
    assert parse(b"preamble\r\n" + first + END) == ([b"one"], {})
    # The delimiter's text inside a part's content (not at a line start), then spaces: content.
    content = b"x--" + BOUNDARY.encode() + b" " * (MAX_TRANSPORT_PADDING + 10)
    assert parse(field("images", content, "a.png") + END) == ([content], {})


def test_a_preamble_before_the_first_delimiter_is_ignored() -> None:
    body = field("images", b"one", "a.png") + field("crop", b"none") + END
    for preamble in (b"This is a multipart message.\r\n", b"\r\n"):
        images, options = parse(preamble + body)
        assert images == [b"one"] and options == {"crop": ["none"]}
    with pytest.raises(MalformedRequestError):  # no delimiter after the text at all
        parse(b"just text\r\n")


@pytest.fixture
def restored_multipart_log_level() -> Iterator[None]:
    library = logging.getLogger("python_multipart")
    level = library.level
    yield
    library.setLevel(level)


@pytest.mark.usefixtures("restored_multipart_log_level")
def test_the_multipart_parsers_warnings_about_a_clients_body_stay_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_client_noise()  # as python -m service does at start
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(MalformedRequestError, match="Did not find CR at end of boundary"),
    ):
        parse_upload(
            b"--xyzQ\r\n",
            content_type="multipart/form-data; boundary=xyz",
            query=[],
            max_images=4,
        )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
