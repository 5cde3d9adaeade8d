"""Decoding uploads: every supported format and mode, refusals, and fuzzed bytes."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.decode import decode_image, decode_reduced
from service.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    NotAnImageError,
    ServiceError,
    UnsupportedImageFormatError,
)
from tests.service.conftest import encode, gradient_rgb

LIMIT = 10**7
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def rgb_image(width: int = 24, height: int = 16) -> Image.Image:
    return Image.fromarray(gradient_rgb(width, height))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    image = rgb_image()
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(image, fmt, **params), max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_jpeg_decodes_close_to_the_source() -> None:
    image = rgb_image(64, 48)
    decoded = decode_image(encode(image, "JPEG", quality=95), max_pixels=LIMIT)
    assert decoded.size == (64, 48)
    error = np.abs(np.asarray(decoded, np.int16) - np.asarray(image, np.int16))
    assert error.mean() < 4


def test_gif_gives_the_first_frame() -> None:
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    blue = Image.new("RGB", (10, 10), (0, 0, 255))
    buffer = io.BytesIO()
    red.save(buffer, format="GIF", save_all=True, append_images=[blue], duration=10, loop=0)
    decoded = decode_image(buffer.getvalue(), max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[5, 5].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("orientation", "expected_size"), [(1, (30, 20)), (3, (30, 20)), (6, (20, 30)), (8, (20, 30))]
)
def test_exif_orientation_is_applied(orientation: int, expected_size: tuple[int, int]) -> None:
    image = Image.new("RGB", (30, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 5, 5))  # white marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=100), max_pixels=LIMIT)
    assert decoded.size == expected_size
    corners = {
        1: (1, 1),
        3: (expected_size[0] - 2, expected_size[1] - 2),  # rotated 180
        6: (expected_size[0] - 2, 1),  # rotated 90 clockwise on display
        8: (1, expected_size[1] - 2),
    }
    x, y = corners[orientation]
    assert np.asarray(decoded)[y, x, 0] > 200


def test_modes_become_rgb() -> None:
    image = rgb_image()
    cmyk = decode_image(encode(image.convert("CMYK"), "JPEG", quality=100), max_pixels=LIMIT)
    assert cmyk.mode == "RGB"
    rgba = image.convert("RGBA")
    rgba.putalpha(0)
    decoded = decode_image(encode(rgba, "PNG"), max_pixels=LIMIT)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))  # alpha dropped
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(encode(palette, "PNG"), max_pixels=LIMIT).mode == "RGB"
    grey = decode_image(encode(image.convert("L"), "PNG"), max_pixels=LIMIT)
    assert grey.mode == "RGB"
    assert decode_image(encode(image.convert("LA"), "PNG"), max_pixels=LIMIT).mode == "RGB"
    assert decode_image(encode(image.convert("1"), "PNG"), max_pixels=LIMIT).mode == "RGB"


def test_sixteen_bit_greyscale_is_scaled() -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    for fmt in ["PNG", "TIFF"]:
        decoded = decode_image(encode(image, fmt), max_pixels=LIMIT)
        assert decoded.mode == "RGB"
        assert np.asarray(decoded)[0, :, 0].tolist() == [0, 128, 255]


def test_refusals() -> None:
    with pytest.raises(EmptyImageError):
        decode_image(b"", max_pixels=LIMIT)
    with pytest.raises(NotAnImageError):
        decode_image(b"%PDF-1.4 definitely not an image", max_pixels=LIMIT)
    with pytest.raises(CorruptImageError):
        decode_image(encode(rgb_image(64, 64), "JPEG")[:200], max_pixels=LIMIT)
    with pytest.raises(UnsupportedImageFormatError):
        decode_image(encode(rgb_image(), "PPM"), max_pixels=LIMIT)
    with pytest.raises(ImageTooLargeError, match="24x16"):
        decode_image(encode(rgb_image(), "PNG"), max_pixels=24 * 16 - 1)
    assert decode_image(encode(rgb_image(), "PNG"), max_pixels=24 * 16).size == (24, 16)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` followed by a tiny IDAT: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5_000, 50_000])
def test_decompression_bombs_are_refused_from_the_header(side: int) -> None:
    # The body is ~100 bytes: a refusal that names the size proves no pixel was decoded.
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(_png_header_only(side, side), max_pixels=LIMIT, index=3)


def test_pillows_own_bomb_limit_is_reported_with_the_service_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default
    # 30000 x 30000 is above twice Pillow's threshold: Image.open itself refuses it.
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(_png_header_only(30_000, 30_000), max_pixels=LIMIT, index=2)
    assert info.value.message == f"the image has 900000000 pixels, more than the limit of {LIMIT}"
    assert info.value.index == 2


def test_a_budget_above_pillows_threshold_is_the_one_that_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pillow's threshold scaled down (default 89.5 Mpx, refusal above twice that) so that the
    # image stays small: 60 x 60 = 3600 pixels, within the budget, over twice Pillow's 1000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    header = _png_header_only(60, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Accepted by the budget; its pixel data (a 64-byte IDAT) is what fails.
        with pytest.raises(CorruptImageError):
            decode_image(header, max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS == 5_000
    with pytest.raises(ImageTooLargeError, match="3600 pixels, more than the limit of 3599"):
        decode_image(header, max_pixels=3_599)
    assert Image.MAX_IMAGE_PIXELS == 5_000  # never lowered: the threshold is process-wide


def test_errors_carry_the_index() -> None:
    with pytest.raises(ServiceError) as info:
        decode_image(b"\x00\x01", max_pixels=LIMIT, index=7)
    assert info.value.index == 7


_SEEDS = [encode(rgb_image(12, 9), fmt) for fmt in ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]]


def _check_decoder(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=10**6)
    except ServiceError as err:
        assert err.status in (400, 413, 415)
        assert err.message
    else:
        assert image.mode == "RGB" and image.width * image.height <= 10**6
        image.tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_domain_errors(data: bytes) -> None:
    _check_decoder(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(range(len(_SEEDS))),
    edits=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 4096)),
)
def test_fuzz_mutated_images_only_raise_domain_errors(
    seed: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _check_decoder(bytes(data))


def _mpo(first: Image.Image, second: Image.Image) -> bytes:
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second], quality=95)
    return buffer.getvalue()


def test_mpo_gives_the_first_picture() -> None:
    data = _mpo(Image.new("RGB", (24, 16), (255, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 255)))
    assert Image.open(io.BytesIO(data)).format == "MPO"  # a phone camera's multi-picture JPEG
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (24, 16)
    red, green, blue = np.asarray(decoded)[8, 12].tolist()
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("cut", [8, 12, 20, 33, 37])
def test_png_truncated_in_its_header_is_corrupt(cut: int) -> None:
    data = encode(rgb_image(), "PNG")[:cut]  # signature (8 bytes) + part or all of IHDR
    with pytest.raises(CorruptImageError):
        decode_image(data, max_pixels=LIMIT, index=2)


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "TIFF", "WEBP"])
def test_other_formats_truncated_in_their_header_are_corrupt(fmt: str) -> None:
    with pytest.raises(CorruptImageError):
        decode_image(encode(rgb_image(), fmt)[:12], max_pixels=LIMIT)


def test_text_that_resembles_no_format_is_not_an_image() -> None:
    for data in [b"PNG is a format", b"RIFF....AVI LIST", b"II am plain text"]:
        with pytest.raises(NotAnImageError):
            decode_image(data, max_pixels=LIMIT)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_wide_greyscale_matches_the_float64_formula(mode: str) -> None:
    """Integer/float32 in-place conversion gives what the float64 formula gives, bit for bit."""
    from service.decode import to_rgb

    rng = np.random.default_rng(0)
    if mode == "F":
        values = rng.uniform(-50, 300, (17, 23)).astype(np.float32)
        values[0, :3] = [np.nan, np.inf, -np.inf]
        image = Image.fromarray(values, mode="F")
        expected = np.clip(np.nan_to_num(values.astype(np.float64)), 0, 255).astype(np.uint8)
    else:
        low = -70000 if mode == "I" else 0
        high = 140000 if mode == "I" else 65536
        values = rng.integers(low, high, (17, 23))
        values[0, :4] = [0, 65535, 128, 257 * 100 + 128]
        if mode == "I":
            image = Image.fromarray(values.astype(np.int32), mode="I")
        else:
            image = Image.new(mode, (23, 17))
            image.putdata(values.astype(np.uint16).ravel().tolist())
            values = np.asarray(image).astype(np.int64)
        scaled = np.rint(values.astype(np.float64) * (255.0 / 65535.0))
        expected = np.clip(scaled, 0, 255).astype(np.uint8)
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (17, 23, 3)
    np.testing.assert_array_equal(rgb[..., 0], expected)


def _photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([np.sin(x / 37 + c) * 90 + np.cos(y / 23) * 30 + 128 for c in range(3)], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_large_jpeg_decodes_at_the_smallest_scale_that_covers_what_is_needed(
    orientation: int,
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_photo(1600, 1200), "JPEG", exif=exif, quality=90)
    displayed = (1200, 1600) if orientation in (5, 6, 7, 8) else (1600, 1200)
    asked: list[tuple[int, int]] = []

    def needed(width: int, height: int) -> tuple[float, float]:
        asked.append((width, height))
        return width / 3.5, height / 3.5  # 1/2 covers it, 1/4 would not

    image, full = decode_reduced(data, max_pixels=LIMIT, needed=needed)
    assert set(asked) == {displayed} and full == displayed
    assert image.size == (displayed[0] // 2, displayed[1] // 2) and image.mode == "RGB"
    exact = decode_image(data, max_pixels=LIMIT).resize(image.size, Image.Resampling.BOX)
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(exact, np.int16))
    assert difference.mean() < 2.0  # the same picture, in the same orientation


def test_a_reduced_decode_applies_only_to_jpeg_and_only_when_it_can() -> None:
    photo = _photo(1600, 1200)
    png = encode(photo, "PNG")
    image, full = decode_reduced(png, max_pixels=LIMIT, needed=lambda w, h: (w / 8, h / 8))
    assert image.size == full == (1600, 1200)
    jpeg = encode(photo, "JPEG", quality=90)
    image, full = decode_reduced(jpeg, max_pixels=LIMIT, needed=lambda w, h: (w, h))
    assert image.size == full == (1600, 1200)  # the resize needs every pixel
    assert np.array_equal(np.asarray(image), np.asarray(decode_image(jpeg, max_pixels=LIMIT)))
    image, _ = decode_reduced(jpeg, max_pixels=LIMIT, needed=lambda w, h: (1, 1))
    assert image.size == (200, 150)  # libjpeg's smallest scale, 1/8


def test_a_reduced_decode_still_refuses_damaged_jpegs() -> None:
    data = encode(_photo(1600, 1200), "JPEG", quality=90)
    for damaged in (data[: len(data) // 2], data[:300]):  # cut in the scan, in the header
        with pytest.raises(CorruptImageError):
            decode_reduced(damaged, max_pixels=LIMIT, needed=lambda w, h: (w / 8, h / 8))


@pytest.mark.parametrize(
    ("size", "scale"),
    [((1601, 1193), 1), ((1602, 1194), 2), ((1604, 1196), 4), ((1608, 1200), 8)],
)
def test_only_a_scale_that_divides_both_sides_is_used(size: tuple[int, int], scale: int) -> None:
    # A rounded-up reduced size carries a partial block at one edge, which would shift the crop.
    data = encode(_photo(*size), "JPEG", quality=90)
    image, full = decode_reduced(data, max_pixels=LIMIT, needed=lambda w, h: (1, 1))
    assert full == size and image.size == (size[0] // scale, size[1] // scale)


def test_an_orientation_value_pillow_does_not_apply_swaps_nothing() -> None:
    exif = Image.Exif()
    exif[0x0112] = 9  # not an orientation: ImageOps.exif_transpose leaves the image as stored
    data = encode(_photo(1600, 1200), "JPEG", exif=exif, quality=90)
    asked: list[tuple[int, int]] = []

    def needed(width: int, height: int) -> tuple[float, float]:
        asked.append((width, height))
        return width / 7, height / 7

    image, full = decode_reduced(data, max_pixels=LIMIT, needed=needed)
    assert full == decode_image(data, max_pixels=LIMIT).size == (1600, 1200)
    assert image.size == (400, 300) and set(asked) == {(1600, 1200)}


def test_a_reduction_that_falls_short_is_decoded_again_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The safety net for a reduction planned on the wrong orientation: whatever the plan, the
    # decoded image covers what the resize needs, or the image is decoded at its full size.
    import service.decode as decode_module

    monkeypatch.setattr(decode_module, "_reduction", lambda image, needed: 8)
    data = encode(_photo(1600, 1200), "JPEG", quality=90)
    image, full = decode_reduced(data, max_pixels=LIMIT, needed=lambda w, h: (w / 3, h / 3))
    assert full == (1600, 1200) and image.size == (1600, 1200)
    image, full = decode_reduced(data, max_pixels=LIMIT, needed=lambda w, h: (w / 9, h / 9))
    assert full == (1600, 1200) and image.size == (200, 150)  # 1/8 covers it: kept
