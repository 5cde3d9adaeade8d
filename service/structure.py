"""Bounded checks of an image file's structure, before a decoder walks it.

The pixel budget bounds what decoding allocates for pixels, but not the work and memory that
the file's own structure can demand: a progressive JPEG can repeat its scans thousands of times
(each one a pass over every coefficient of the image), a JPEG or PNG can hold millions of empty
segments that Pillow walks one by one in Python and keeps in lists, a GIF can put millions of
extension blocks before its first frame, and a TIFF can declare tiles far larger than its image
(libtiff allocates a whole tile). These checks walk the container at memory speed, stop at fixed
counts, and refuse such files with :class:`~service.errors.ImageTooComplexError` before Pillow
sees them. Files these checks cannot follow are left to the decoder, which reports them as
corrupt.
"""

from __future__ import annotations

import re

from service.errors import ImageTooComplexError

MAX_JPEG_SCANS = 1000
"""Most JPEG scans (SOS markers): baseline files have 1, libjpeg's progressive mode 10,
``jpegtran -scans`` scripts with one scan per coefficient about 200."""
MAX_JPEG_SCAN_PIXELS = 4 * 10**9
"""Most scans x pixels of a JPEG: each scan is a pass over the image (100 scans of 40 MP, about
3 s of one core; a 318 KB file of 3000 scans of 36 MP took 71 s)."""
MAX_JPEG_MARKERS = 4000
"""Most JPEG markers in all: a scan and its Huffman tables at the scan limit, plus metadata
(ICC profiles and extended XMP split into at most a few hundred segments)."""
MAX_PNG_CHUNKS = 65536
"""Most PNG chunks in all (a 64 MiB PNG written in libpng's 8 KiB IDAT chunks has 8192)."""
MAX_PNG_CHUNKS_BEFORE_DATA = 1000
"""Most PNG chunks before the first IDAT: the header Pillow parses when it opens the file."""
MAX_GIF_BLOCKS_BEFORE_IMAGE = 100_000
"""Most GIF extension blocks and sub-blocks (and stray bytes) before the first frame (a 1 MB
XMP needs about 4000)."""
TILE_SLACK_PIXELS = 2**20
"""A TIFF tile may always cover this many pixels (a 1024 x 1024 tile), whatever the image."""

_FILL = re.compile(rb"\xff+")
# The end of a scan's entropy-coded data: 0xFF followed by a marker code, not by a stuffed
# zero (0xFF00), a restart marker (RST0-7, which stay inside the scan) or another fill byte.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC), which give the image's size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# What Pillow acts on between GIF blocks: an extension, an image, the trailer. It skips any
# other byte, one at a time.
_GIF_BLOCK = re.compile(rb"[!,;]")


def check_structure(data: bytes, *, index: int | None = None) -> None:
    """Refuse JPEG, PNG and GIF files whose structure would cost far more than their pixels.

    Other formats, and files these walks cannot follow (left to the decoder), pass.

    Args:
        data: The file's bytes.
        index: Position of the image in the request, carried into errors.

    Raises:
        ImageTooComplexError: More JPEG scans or markers, PNG chunks or GIF blocks than the
            limits of this module.
    """
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data, index)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png(data, index)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif(data, index)


def check_tiles(
    width: int, height: int, tile: tuple[int, int] | None, *, index: int | None = None
) -> None:
    """Refuse a tiled TIFF whose tiles are far larger than its image.

    libtiff allocates one whole tile to decode it, so a 64 x 64 image declaring 16384 x 16384
    tiles would cost about 800 MB of memory for 12 KB of pixels.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        tile: ``(tile width, tile length)`` from the TIFF tags, None for a striped file.
        index: Position of the image in the request, carried into errors.

    Raises:
        ImageTooComplexError: A tile covers more than twice the image's pixels and more than
            :data:`TILE_SLACK_PIXELS`.
    """
    if tile is None:
        return
    tile_pixels = tile[0] * tile[1]
    if tile_pixels > max(2 * width * height, TILE_SLACK_PIXELS):
        raise ImageTooComplexError(
            f"the TIFF declares {tile[0]}x{tile[1]} tiles for a {width}x{height} image; "
            "decoding would allocate far more memory than the image holds",
            index=index,
        )


def _check_jpeg(data: bytes, index: int | None) -> None:
    position, size = 2, len(data)
    markers = scans = pixels = 0

    def count_marker() -> None:
        nonlocal markers
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise ImageTooComplexError(
                f"the JPEG holds more than {MAX_JPEG_MARKERS} markers; re-encode it", index=index
            )

    while position + 4 <= size:
        if data[position] != 0xFF:
            # Bytes where a marker belongs: Pillow and libjpeg skip them up to the next 0xFF
            # (libjpeg with a warning) and go on, so the walk does too, counting the run.
            count_marker()
            position = data.find(b"\xff", position)
            if position < 0:
                return
            continue
        fill = _FILL.match(data, position)
        if fill is None:  # pragma: no cover - data[position] is 0xFF
            return
        position = fill.end() - 1  # the last 0xFF of a run of fill bytes
        if position + 4 > size:
            return
        marker = data[position + 1]
        count_marker()
        if marker == 0x00:  # an escaped 0xFF outside a scan: skipped by the decoders
            position += 2
            continue
        if marker == 0xD9:  # EOI: what follows (an MPO's next picture) is not decoded
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn carry no length
            position += 2
            continue
        if marker in _SOF_MARKERS and position + 9 <= size:
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            pixels = max(pixels, width * height)
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # SOS: the scan's entropy-coded data follows its header
            scans += 1
            if scans > MAX_JPEG_SCANS or scans * pixels > MAX_JPEG_SCAN_PIXELS:
                raise ImageTooComplexError(
                    f"the JPEG holds more than {scans - 1} scans of its {pixels} pixels (a "
                    "progressive JPEG usually has about 10; at most "
                    f"{MAX_JPEG_SCAN_PIXELS:.0e} scanned pixels and {MAX_JPEG_SCANS} scans are "
                    "decoded); re-encode it",
                    index=index,
                )
            end = _SCAN_END.search(data, position)
            if end is None:
                return
            position = end.start()


def _check_png(data: bytes, index: int | None) -> None:
    position, size = len(_PNG_SIGNATURE), len(data)
    chunks = 0
    seen_data = False
    while position + 8 <= size:
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        chunks += 1
        seen_data = seen_data or kind == b"IDAT"
        if chunks > MAX_PNG_CHUNKS or (not seen_data and chunks > MAX_PNG_CHUNKS_BEFORE_DATA):
            where = "in all" if seen_data else "before its image data"
            limit = MAX_PNG_CHUNKS if seen_data else MAX_PNG_CHUNKS_BEFORE_DATA
            raise ImageTooComplexError(
                f"the PNG holds more than {limit} chunks {where}; re-encode it", index=index
            )
        if kind == b"IEND":
            return
        position += 12 + length  # length, type, data, CRC


def _check_gif(data: bytes, index: int | None) -> None:
    size = len(data)
    if size < 13:
        return
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # global colour table
    blocks = 0

    def count_blocks(count: int) -> None:
        nonlocal blocks
        blocks += count
        if blocks > MAX_GIF_BLOCKS_BEFORE_IMAGE:
            raise ImageTooComplexError(
                f"the GIF holds more than {MAX_GIF_BLOCKS_BEFORE_IMAGE} extension blocks "
                "before its first frame; re-encode it",
                index=index,
            )

    while position < size:
        introducer = data[position]
        if introducer in (0x2C, 0x3B):  # the first image descriptor, or the trailer
            return
        if introducer != 0x21:  # other bytes are skipped by Pillow one by one: count them
            found = _GIF_BLOCK.search(data, position)
            count_blocks((found.start() if found else size) - position)
            if found is None:
                return
            position = found.start()
            continue
        position += 2  # introducer and label
        while position < size:  # data sub-blocks, ended by a zero length
            count_blocks(1)
            length = data[position]
            position += 1 + length
            if length == 0:
                break
