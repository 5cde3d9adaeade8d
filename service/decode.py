"""Image bytes -> RGB PIL image, refusing bad input with domain errors.

The pixel budget is checked from the header (``Image.open`` reads only the header) before any
pixel is decoded, so a decompression bomb never allocates its pixels. Animated images (and
multi-picture JPEGs, MPO, as phone cameras write them) give their first frame, EXIF orientation
is applied, and every mode ends as 8-bit RGB (alpha is dropped like torchvision's
``pil_loader``, which DINO trains with).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    NotAnImageError,
    UnsupportedImageFormatError,
)
from service.structure import check_structure, check_tiles

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
# Leading bytes of the supported formats: data that starts like one of them but that no decoder
# can open is a damaged file of that format (corrupt_image), not some other kind of data.
_SIGNATURES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG and MPO
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _allow_pixels(max_pixels: int) -> None:
    """Make the service's pixel budget the one that applies, not Pillow's.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` (89.5 million by default) and refuses
    images above twice that in ``Image.open``. Raising its threshold to at least
    ``max_pixels`` keeps every image the service accepts clear of both (a budget above 179
    million pixels would otherwise be cut short with Pillow's message); images above the
    budget are refused from the header anyway. Pillow's threshold is process-wide, so it is
    only ever raised (idempotent, so harmless from several decoding threads).
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


# Given the displayed (EXIF-oriented) size of an image, the smallest (width, height) the decoded
# image must keep for what follows (the resize target, expressed for the whole image).
Needed = Callable[[int, int], tuple[float, float]]


def decode_image(data: bytes, *, max_pixels: int, index: int | None = None) -> Image.Image:
    """Decode one uploaded image to RGB, at its full size.

    Args:
        data: The file's bytes.
        max_pixels: Largest ``width * height`` accepted.
        index: Position of the image in the request, carried into errors.

    Returns:
        A loaded 8-bit RGB image with EXIF orientation applied.

    Raises:
        See :func:`decode_reduced`.
    """
    return decode_reduced(data, max_pixels=max_pixels, index=index, needed=None)[0]


def decode_reduced(
    data: bytes, *, max_pixels: int, needed: Needed | None, index: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode one uploaded image to RGB, a large JPEG at a reduced scale when ``needed`` allows.

    libjpeg can decode at 1/2, 1/4 or 1/8 of the stored size (scaling in the DCT domain), several
    times faster for a photo much larger than a model's input. The reduced image is not
    bit-identical to a full decode resized afterwards, so this runs only when asked for
    (``DINO_JPEG_DRAFT``); other formats, and JPEGs that ``needed`` wants at their full size,
    decode in full.

    Args:
        data: The file's bytes.
        max_pixels: Largest ``width * height`` accepted (of the stored size).
        needed: Given the displayed size, the smallest size the decoded image must keep in
            both directions; None: always decode in full.
        index: Position of the image in the request, carried into errors.

    Returns:
        A loaded 8-bit RGB image with EXIF orientation applied, and the image's displayed
        ``(width, height)`` at its full size.

    Raises:
        EmptyImageError: Zero bytes.
        NotAnImageError: No supported decoder recognises the bytes.
        UnsupportedImageFormatError: A recognised format outside :data:`SUPPORTED_FORMATS`.
        ImageTooLargeError: More than ``max_pixels`` pixels.
        ImageTooComplexError: A file structure that would cost far more than its pixels
            (:mod:`service.structure`).
        CorruptImageError: Truncated or corrupt pixel data.
    """
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)", index=index)
    _allow_pixels(max_pixels)
    check_structure(data, index=index)
    image = _open(data, max_pixels=max_pixels, index=index)
    if image.format == "TIFF":
        tags = image.tag_v2  # type: ignore[attr-defined]
        tile = (tags.get(322), tags.get(323))  # TileWidth, TileLength
        if isinstance(tile[0], int) and isinstance(tile[1], int):
            check_tiles(image.width, image.height, (tile[0], tile[1]), index=index)
    # JPEG only: its EXIF comes with the header (Pillow's PNG reads the pixels for it, and would
    # swallow their damage here). Worked out before the decoding, whose errors are the upload's.
    scale = 1
    if needed is not None and image.format in ("JPEG", "MPO"):
        scale = _reduction(image, needed)
    try:
        image.seek(0)  # first frame of animated GIF/WebP and multi-page TIFF
        if scale > 1:
            image.draft(None, (image.width // scale, image.height // scale))
        image.load()
        rgb = to_rgb(_apply_orientation(image))
    except (ImageTooLargeError, CorruptImageError):
        raise
    except Exception as err:  # any decoder failure on user bytes is the user's
        raise CorruptImageError(
            f"the {image.format or 'image'} data is truncated or corrupt: {_describe(err)}",
            index=index,
        ) from err
    if scale == 1:
        return rgb, rgb.size
    full = (rgb.width * scale, rgb.height * scale)  # exact: the scale divides both sides
    wanted = needed(*full) if needed is not None else (0.0, 0.0)
    if rgb.width < wanted[0] or rgb.height < wanted[1]:
        # The orientation read from the header was not the one applied (an odd EXIF value):
        # the reduction was planned for the other side. Decode in full instead.
        return decode_reduced(data, max_pixels=max_pixels, needed=None, index=index)
    return rgb, full


def _open(data: bytes, *, max_pixels: int, index: int | None) -> Image.Image:
    """Read the header only and enforce the format list and the pixel budget."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        # Pillow's own limit, at least twice max_pixels: say it with the service's limit.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{found[1]} pixels" if found else "more pixels than Pillow opens"
        raise ImageTooLargeError(
            f"the image has {size}, more than the limit of {max_pixels}", index=index
        ) from err
    except UnidentifiedImageError as err:
        if _looks_like_supported(data):
            raise CorruptImageError(
                "the image header is truncated or corrupt (the data starts like a supported "
                "format but cannot be opened)",
                index=index,
            ) from err
        raise NotAnImageError(
            f"the data is not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})",
            index=index,
        ) from err
    except Exception as err:  # malformed headers raise assorted errors
        message = f"the image header is corrupt: {_describe(err)}"
        raise CorruptImageError(message, index=index) from err
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageFormatError(
            f"image format {image.format} is not supported; use one of "
            f"{', '.join(SUPPORTED_FORMATS)}",
            index=index,
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImageError(f"the image has an invalid size {width}x{height}", index=index)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image has {width}x{height} = {width * height} pixels, more than the limit "
            f"of {max_pixels}",
            index=index,
        )
    return image


def _reduction(image: Image.Image, needed: Needed) -> int:
    """The DCT scale (8, 4, 2, or 1 for none) to decode a JPEG at, from its header.

    Only a scale that divides both stored sides: libjpeg then decodes exactly ``size / scale``
    pixels, without the partial block that a rounded-up size carries at one edge (which would
    shift the crop by up to 7/8 of an output pixel). The largest such scale that keeps both
    sides at or above ``needed`` wins.
    """
    width, height = image.size
    orientation = 1
    with contextlib.suppress(Exception):  # unreadable EXIF: the stored orientation stays
        # the raw value, looked up as ImageOps.exif_transpose does ("6" rotates nothing)
        orientation = image.getexif().get(0x0112, 1)
    quarter_turn = orientation in (5, 6, 7, 8)
    displayed = (height, width) if quarter_turn else (width, height)
    need_w, need_h = needed(*displayed)
    if quarter_turn:
        need_w, need_h = need_h, need_w  # back to the stored orientation
    for scale in (8, 4, 2):
        if width % scale or height % scale:
            continue
        if width // scale >= math.ceil(need_w) and height // scale >= math.ceil(need_h):
            return scale
    return 1


def _looks_like_supported(data: bytes) -> bool:
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return True
    return data.startswith(_SIGNATURES)


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag; a broken EXIF block is ignored."""
    # In place: otherwise Pillow returns a full copy even when nothing is rotated. Unreadable
    # EXIF keeps the stored orientation; an orientation read but not written back is applied.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer greyscale is scaled from 0..65535 to 0..255, float greyscale is
    clipped to 0..255, palette images go through RGBA (so transparency is resolved), CMYK and
    the rest use PIL's conversion. Alpha is dropped.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # Integer arithmetic in place (4 bytes a pixel, not float64 temporaries): round(v * 255
        # / 65535) exactly, as 65535 = 255 * 257 leaves no ties.
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32, copy=False)
        values *= 255
        values += 32767
        values //= 65535
        return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.array(image, dtype=np.float32)  # a writable copy, worked on in place
        np.nan_to_num(values, copy=False)
        np.clip(values, 0, 255, out=values)
        return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _describe(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text[:200]
