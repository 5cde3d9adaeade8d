"""RGB image -> ``pixel_values`` following the model's :class:`PreprocessingRecipe`.

Two geometries:

* ``center``: DINO's evaluation transform, exactly as torchvision does it on PIL images:
  resize the shorter side to ``resize_size`` (the longer side truncated to an integer), then
  crop ``resolution x resolution`` from the centre (when the crop drops at least a quarter of
  the resized columns, Pillow's second pass runs on the kept ones only, with the same pixels:
  :mod:`service.resample`). When that resized image would exceed
  :data:`EXACT_RESIZE_MAX_PIXELS` (only for extreme aspect ratios, such as a 1x100000 strip), the
  region that survives the crop is resized directly from the source instead (Pillow's
  ``resize(box=...)``), so memory stays bounded by the crop; the sampling positions are the
  same, but Pillow's fixed-point arithmetic makes such images differ slightly from torchvision.
* ``none``: keep the whole image. The shorter side goes to ``resolution``, the longer side
  follows the aspect ratio (capped at ``max_side``), and both sides are rounded to the nearest
  patch multiple; the small aspect change from that rounding is the only distortion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from models.contract import PreprocessingRecipe, plan_center_crop, resize_for_crop
from service.resample import resize_then_crop

Crop = Literal["center", "none"]

EXACT_RESIZE_MAX_PIXELS = 8_000_000
"""Largest intermediate (resized, before the crop) image of ``crop=center`` built in full."""

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels go.

    Attributes:
        resized: ``(width, height)`` after the resize (for ``center``, the torchvision
            intermediate, which is not built when ``source_box`` is set).
        crop_box: ``(left, top, right, bottom)`` of the crop in the resized image, or None.
        size: ``(width, height)`` fed to the model; both multiples of the patch size.
        source_box: ``(left, top, right, bottom)`` of the crop in source coordinates when the
            crop region is resized directly to ``size`` (intermediate over budget), else None.
    """

    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int] | None
    size: tuple[int, int]
    source_box: tuple[float, float, float, float] | None = None


def round_to_patch(value: float, patch_size: int) -> int:
    """Nearest multiple of ``patch_size``, at least one patch."""
    return max(patch_size, int(round(value / patch_size)) * patch_size)


def plan_geometry(
    width: int,
    height: int,
    *,
    recipe: PreprocessingRecipe,
    resolution: int,
    crop: Crop,
    patch_size: int,
    max_side: int,
) -> Geometry:
    """Compute the resize and crop of a ``width x height`` image.

    Args:
        width: Original width.
        height: Original height.
        recipe: The model's recipe (its ``resize_size`` applies at its own resolution).
        resolution: Requested side (a patch multiple): crop side, or shorter side for ``none``.
        crop: ``center`` or ``none``.
        patch_size: The model's patch size.
        max_side: Largest processed side for ``none``.

    Returns:
        The geometry.
    """
    if crop == "center":
        short_target = (
            recipe.resize_size if resolution == recipe.resolution else resize_for_crop(resolution)
        )
        plan = plan_center_crop(
            width,
            height,
            resize_size=short_target,
            resolution=resolution,
            max_pixels=EXACT_RESIZE_MAX_PIXELS,
        )
        return Geometry(
            resized=plan.resized,
            crop_box=plan.crop_box,
            size=(resolution, resolution),
            source_box=plan.source_box,
        )
    limit = max(patch_size, (max_side // patch_size) * patch_size)
    scale = resolution / min(width, height)
    if max(width, height) * scale > limit:
        scale = limit / max(width, height)
    new_width = min(round_to_patch(width * scale, patch_size), limit)
    new_height = min(round_to_patch(height * scale, patch_size), limit)
    return Geometry(resized=(new_width, new_height), crop_box=None, size=(new_width, new_height))


def to_pixels(image: Image.Image, geometry: Geometry, recipe: PreprocessingRecipe) -> np.ndarray:
    """Resize, crop and normalise an RGB image (:func:`resize_and_crop`, then :func:`normalize`).

    Returns:
        ``[3, height, width]`` float32, ``(x / 255 - mean) / std``.

    Raises:
        ValueError: The recipe names an unknown interpolation.
    """
    return normalize(np.asarray(resize_and_crop(image, geometry, recipe)), recipe)


def resize_and_crop(
    image: Image.Image, geometry: Geometry, recipe: PreprocessingRecipe
) -> Image.Image:
    """Bring an RGB image to ``geometry.size`` with the recipe's interpolation.

    Raises:
        ValueError: The recipe names an unknown interpolation.
    """
    try:
        resample = INTERPOLATIONS[recipe.interpolation]
    except KeyError as err:
        raise ValueError(f"unknown interpolation {recipe.interpolation!r}") from err
    if geometry.source_box is not None:
        return image.resize(geometry.size, resample, box=geometry.source_box)
    if geometry.crop_box is not None:  # the same pixels as resizing it all, then cropping
        return resize_then_crop(image, geometry.resized, geometry.crop_box, resample)
    if image.size != geometry.resized:
        image = image.resize(geometry.resized, resample)
    return image


def normalize(rgb: np.ndarray, recipe: PreprocessingRecipe) -> np.ndarray:
    """``(x / 255 - mean) / std`` of 8-bit RGB pixels, channel-first.

    Args:
        rgb: ``[height, width, 3]`` uint8.
        recipe: Mean and standard deviation per channel.

    Returns:
        ``[3, height, width]`` float32.
    """
    # Channel-first while still uint8, then the same float32 operations in place (bit-identical
    # to normalising (H, W, 3) and transposing, with one float pass fewer and no temporaries).
    height, width = rgb.shape[:2]
    pixels = np.empty((3, height, width), dtype=np.float32)
    pixels[...] = rgb.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    pixels /= np.float32(255.0)
    pixels -= np.asarray(recipe.mean, dtype=np.float32)[:, None, None]
    pixels /= np.asarray(recipe.std, dtype=np.float32)[:, None, None]
    return pixels
