"""Pillow's resize followed by a crop, without the second pass over columns the crop drops.

DINO's evaluation transform resizes the whole image (shorter side to 256) and then keeps a
224x224 centre crop. Pillow resizes in two separable passes, each rounded to 8 bits:
horizontal first, unless the height shrinks by more than twice what the width does. In the
horizontal-first order each output column of the vertical pass depends only on the same column
of the horizontal pass's result, so the vertical pass can run on the kept columns alone: about
a third less of that pass for a 4:3 landscape image. Both passes are Pillow's own, with the
same sizes, so the result equals ``image.resize(size, resample).crop(box)`` to the bit
(``tests/service/test_resample.py`` compares them over random geometries). It is done only when
the crop drops at least a quarter of the columns: for a portrait image (an eighth dropped) the
extra call and copy cost more than they save.

What was measured and left out (``python -m bench.resize_crop``; README, "Benchmarks"): also
running the first pass on the kept rows only (which needs the second pass to run on a blank
canvas of the full height) was slower for most sizes, because of the copies; and Pillow's
``resize(box=...)`` takes the box in single precision, which moves the sampling positions.
"""

from __future__ import annotations

from PIL import Image

SPLIT_FILTERS = frozenset(
    {
        Image.Resampling.BOX,
        Image.Resampling.BILINEAR,
        Image.Resampling.HAMMING,
        Image.Resampling.BICUBIC,
        Image.Resampling.LANCZOS,
    }
)
"""The recipes' filters that Pillow applies as two convolution passes (nearest takes another
route; Pillow's MKS2013 and MKS2021 are not offered by recipes)."""


def resize_then_crop(
    image: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: Image.Resampling,
) -> Image.Image:
    """``image.resize(size, resample).crop(box)``, with the same pixels and less work.

    Args:
        image: The source image; only RGB images are split.
        size: ``(width, height)`` of the whole resized image.
        box: ``(left, top, right, bottom)`` of the crop in the resized image.
        resample: Pillow's filter; only those in :data:`SPLIT_FILTERS` are split.

    Returns:
        The cropped region, ``right - left`` by ``bottom - top``.
    """
    width, height = image.size
    new_width, new_height = size
    left, top, right, bottom = box
    split = (
        image.mode == "RGB"
        and resample in SPLIT_FILTERS
        and new_width != width  # both passes run
        and new_height != height
        and horizontal_first(image.size, size)
        and 0 <= left < right <= new_width
        and 0 <= top < bottom <= new_height
        and (new_width - (right - left)) * 4 >= new_width  # else the extra copy costs more
    )
    if not split:
        resized = image if image.size == size else image.resize(size, resample)
        return resized.crop(box)
    # The horizontal pass alone (the height stays), then the vertical pass on the kept columns.
    columns = image.resize((new_width, height), resample).crop((left, 0, right, height))
    return columns.resize((right - left, new_height), resample).crop((0, top, right - left, bottom))


def horizontal_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Pillow's order of passes: vertical first only when the height shrinks by more than twice
    as many pixels as the width does."""
    shrink_x, shrink_y = source[0] - size[0], source[1] - size[1]
    return not (shrink_y > 0 and shrink_y > shrink_x * 2)
