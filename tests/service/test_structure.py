"""Structural checks of image files: costly structures are refused, ordinary files pass."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.decode import decode_image
from service.errors import ImageTooComplexError, ServiceError
from service.structure import (
    MAX_GIF_BLOCKS_BEFORE_IMAGE,
    MAX_JPEG_MARKERS,
    MAX_JPEG_SCAN_PIXELS,
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    MAX_PNG_CHUNKS_BEFORE_DATA,
    TILE_SLACK_PIXELS,
    check_structure,
    check_tiles,
)
from tests.service.conftest import encode, gradient_rgb, progressive_jpeg, repeat_last_scan

PIXELS = 40_000_000


def png_chunk(kind: bytes, payload: bytes = b"") -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with_chunks(before: int, after: int) -> bytes:
    """A 4x4 PNG with ``before`` empty private chunks after IHDR and ``after`` after IDAT."""
    png = encode(Image.fromarray(gradient_rgb(4, 4)), "PNG")
    header_end = 8 + 25  # signature, IHDR
    idat_end = png.rindex(b"IEND") - 4
    return (
        png[:header_end]
        + png_chunk(b"prVa") * before
        + png[header_end:idat_end]
        + png_chunk(b"prVb") * after
        + png[idat_end:]
    )


def gif_with_comment(sub_blocks: int) -> bytes:
    """An 8x8 GIF with a comment extension of ``sub_blocks`` one-byte sub-blocks first."""
    gif = encode(Image.fromarray(gradient_rgb(8, 8)).convert("P"), "GIF")
    flags = gif[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    comment = b"\x21\xfe" + b"\x01c" * sub_blocks + b"\x00"
    return gif[:start] + comment + gif[start:]


def tiled_tiff(pixels: np.ndarray, tile: tuple[int, int]) -> bytes:
    """A little-endian, deflate-compressed, tiled RGB TIFF (Pillow writes only strips)."""
    height, width, _ = pixels.shape
    tile_width, tile_length = tile
    tiles = []
    for top in range(0, height, tile_length):
        for left in range(0, width, tile_width):
            block = np.zeros((tile_length, tile_width, 3), np.uint8)  # edge tiles are padded
            piece = pixels[top : top + tile_length, left : left + tile_width]
            block[: piece.shape[0], : piece.shape[1]] = piece
            tiles.append(zlib.compress(block.tobytes()))
    entries = [  # (tag, type, count, value or offset placeholder)
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, "bits"),
        (259, 3, 1, 8),  # deflate: decoded by libtiff
        (262, 3, 1, 2),  # RGB
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 4, 1, tile_width),
        (323, 4, 1, tile_length),
        (324, 4, len(tiles), "offsets"),
        (325, 4, len(tiles), "counts"),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * len(tiles)
    data_at = counts_at + 4 * len(tiles)
    tile_offsets = [data_at + sum(len(t) for t in tiles[:i]) for i in range(len(tiles))]
    arrays = {"bits": bits_at, "offsets": offsets_at, "counts": counts_at}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if isinstance(value, str):
            if count == 1:  # one tile: the value itself, not an offset
                value = tile_offsets[0] if value == "offsets" else len(tiles[0])
            else:
                value = arrays[value]
        ifd += struct.pack("<HHII", tag, kind, count, value)
    ifd += struct.pack("<I", 0)
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + ifd
        + struct.pack("<3H", 8, 8, 8)
        + struct.pack(f"<{len(tiles)}I", *tile_offsets)
        + struct.pack(f"<{len(tiles)}I", *(len(t) for t in tiles))
        + b"".join(tiles)
    )


def test_ordinary_files_pass_and_decode() -> None:
    jpeg = progressive_jpeg()
    assert 1 < jpeg.count(b"\xff\xda") < MAX_JPEG_SCANS
    exif = Image.Exif()
    exif[0x0112] = 1
    photo = Image.fromarray(gradient_rgb(48, 40))
    with_metadata = encode(photo, "JPEG", exif=exif.tobytes(), icc_profile=b"\0" * 200_000)
    animated = io.BytesIO()
    frames = [Image.fromarray(gradient_rgb(8, 8, seed)).convert("P") for seed in range(50)]
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    for data in [jpeg, with_metadata, encode(photo, "PNG"), animated.getvalue()]:
        check_structure(data)
        decode_image(data, max_pixels=PIXELS)


def test_a_jpeg_repeating_its_scans_is_refused_before_decoding() -> None:
    jpeg = progressive_jpeg()
    scans = jpeg.count(b"\xff\xda")
    check_structure(repeat_last_scan(jpeg, MAX_JPEG_SCANS - scans))  # exactly at the limit
    bomb = repeat_last_scan(jpeg, MAX_JPEG_SCANS - scans + 1)
    with pytest.raises(ImageTooComplexError, match=f"more than {MAX_JPEG_SCANS} scans"):
        check_structure(bomb, index=2)
    with pytest.raises(ImageTooComplexError) as refused:
        decode_image(bomb, max_pixels=PIXELS, index=2)
    assert refused.value.index == 2 and refused.value.code == "image_too_complex"


def test_scans_of_a_large_jpeg_are_bounded_by_their_pixels() -> None:
    # Each scan is a pass over the whole image: 100 scans of 40 MP are allowed, 101 are not.
    jpeg = progressive_jpeg()
    frame = jpeg.index(b"\xff\xc2")  # SOF2: length, precision, height, width
    large = jpeg[: frame + 5] + struct.pack(">HH", 5000, 8000) + jpeg[frame + 9 :]
    allowed = MAX_JPEG_SCAN_PIXELS // (5000 * 8000)
    assert allowed == 100
    scans = large.count(b"\xff\xda")
    check_structure(repeat_last_scan(large, allowed - scans))
    with pytest.raises(ImageTooComplexError, match="more than 100 scans of its 40000000 pixels"):
        check_structure(repeat_last_scan(large, allowed - scans + 1))


def test_junk_between_segments_does_not_end_the_walk() -> None:
    # Pillow and libjpeg skip bytes that are not a marker (and an escaped 0xFF00) and decode
    # on; Pillow's GIF reader skips stray bytes between blocks. The walks must not stop there.
    jpeg = progressive_jpeg()
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    for junk in (b"\x00", b"\xff\x00", b"junk"):
        with_junk = jpeg[:app0_end] + junk + jpeg[app0_end:]
        assert decode_image(with_junk, max_pixels=PIXELS).size == (48, 40)
        check_structure(with_junk)
        bomb = repeat_last_scan(with_junk, MAX_JPEG_SCANS)
        with pytest.raises(ImageTooComplexError, match="scans"):
            check_structure(bomb)
        comments = b"\xff\xfe\x00\x02" * MAX_JPEG_MARKERS  # empty COM segments after the junk
        flood = with_junk[: app0_end + len(junk)] + comments + jpeg[app0_end:]
        with pytest.raises(ImageTooComplexError, match="markers"):
            check_structure(flood)
    stray = b"\x00" * MAX_GIF_BLOCKS_BEFORE_IMAGE
    gif = gif_with_comment(10)
    start = gif.index(b"\x21\xfe")
    assert decode_image(gif[:start] + b"\x00" + gif[start:], max_pixels=PIXELS).size == (8, 8)
    with pytest.raises(ImageTooComplexError, match="extension blocks"):
        check_structure(gif[:start] + stray + gif[start:])
    many = gif_with_comment(MAX_GIF_BLOCKS_BEFORE_IMAGE)
    with pytest.raises(ImageTooComplexError, match="extension blocks"):
        check_structure(many[:start] + b"\x00" + many[start:])


def test_a_jpeg_of_empty_segments_is_refused_but_fill_bytes_are_not_markers() -> None:
    jpeg = progressive_jpeg()
    markers = MAX_JPEG_MARKERS - 100  # the file's own markers stay under the remaining 100
    decode_image(jpeg[:2] + b"\xff\xe1\x00\x02" * markers + jpeg[2:], max_pixels=PIXELS)
    flood = jpeg[:2] + b"\xff\xe1\x00\x02" * MAX_JPEG_MARKERS + jpeg[2:]
    with pytest.raises(ImageTooComplexError, match=f"more than {MAX_JPEG_MARKERS} markers"):
        check_structure(flood)
    # Fill bytes (0xFF runs before a marker) are one marker, however long the run.
    check_structure(jpeg[:2] + b"\xff" * 100_000 + jpeg[2:])


def test_png_chunk_floods_are_refused() -> None:
    ihdr_and = MAX_PNG_CHUNKS_BEFORE_DATA - 1  # IHDR counts: the limit is reached, not passed
    decode_image(png_with_chunks(before=ihdr_and, after=0), max_pixels=PIXELS)
    with pytest.raises(ImageTooComplexError, match="before its image data"):
        check_structure(png_with_chunks(before=ihdr_and + 1, after=0))
    check_structure(png_with_chunks(before=0, after=MAX_PNG_CHUNKS - 3))  # IHDR, IDAT, IEND
    with pytest.raises(ImageTooComplexError, match=f"more than {MAX_PNG_CHUNKS} chunks in all"):
        check_structure(png_with_chunks(before=0, after=MAX_PNG_CHUNKS - 2))


def test_gif_blocks_before_the_first_frame_are_bounded() -> None:
    small = gif_with_comment(1000)
    assert decode_image(small, max_pixels=PIXELS).size == (8, 8)
    check_structure(gif_with_comment(MAX_GIF_BLOCKS_BEFORE_IMAGE - 1))  # and its terminator
    with pytest.raises(ImageTooComplexError, match="extension blocks"):
        check_structure(gif_with_comment(MAX_GIF_BLOCKS_BEFORE_IMAGE))


def test_tile_limit_formula() -> None:
    side = math.isqrt(TILE_SLACK_PIXELS)
    check_tiles(8, 8, (side, side))  # small images may use common tile sizes
    check_tiles(8, 8, None)  # striped
    check_tiles(2000, 2000, (2000, 4000))  # twice the image
    for width, height, tile in [(8, 8, (side + 1, side)), (2000, 2000, (3000, 3000))]:
        with pytest.raises(ImageTooComplexError, match="tiles"):
            check_tiles(width, height, tile)


def test_tiled_tiffs_decode_unless_their_tiles_dwarf_the_image() -> None:
    pixels = gradient_rgb(40, 24)
    decoded = decode_image(tiled_tiff(pixels, (16, 16)), max_pixels=PIXELS)
    np.testing.assert_array_equal(np.asarray(decoded), pixels)
    bomb = tiled_tiff(gradient_rgb(4, 4), (16, 16))
    for tag in (322, 323):  # declare 16384 x 16384 tiles: libtiff would allocate 768 MiB
        bomb = bomb.replace(
            struct.pack("<HHII", tag, 4, 1, 16), struct.pack("<HHII", tag, 4, 1, 16384)
        )
    with pytest.raises(ImageTooComplexError, match="16384x16384 tiles for a 4x4 image"):
        decode_image(bomb, max_pixels=PIXELS, index=0)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8" + b"\xff" * 10,  # fill bytes up to the end
        b"\xff\xd8\xff\xda\x00\x02",  # a scan header and no data
        b"\xff\xd8\xff\xe1\xff\xff",  # a segment longer than the file
        b"GIF89a\x01\x00\x01\x00\xff\x00\x00",  # a colour table cut short
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x21\xfe\x05",  # a sub-block cut short
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHD",  # a chunk header cut short
    ],
)
def test_files_cut_short_are_left_to_the_decoder(data: bytes) -> None:
    check_structure(data)  # no error of its own: decode_image reports them as corrupt
    with pytest.raises(ServiceError) as refused:
        decode_image(data, max_pixels=PIXELS)
    assert refused.value.code == "corrupt_image"


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF89a"]),
    st.binary(max_size=96),
)
def test_fuzz_the_walks_never_fail_on_damaged_files(signature: bytes, tail: bytes) -> None:
    check_structure(signature + tail)  # too short to exceed a limit: no error at all
