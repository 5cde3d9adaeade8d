"""Uploaded bytes -> model pixels for one image: decode, plan, resize and crop, normalise.

The work is split in two: :func:`resize_image` (decode, geometry, budget check, resize and
crop; the costly part) returns 8-bit pixels, and :func:`finish` normalises them into the
float32 ``pixel_values``. :func:`prepare_image` runs both in the calling thread (a decode
thread); a decode process runs both too and sends the finished pixels, which the service only
copies into its batch (:mod:`service.decode_worker`; tests instrument its ``resize_image``).
Everything here depends only on a :class:`PrepareSpec`, which pickles, never on the loaded model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.contract import PreprocessingRecipe
from service.attention import check_attention_budget
from service.decode import decode_reduced
from service.preprocess import Crop, Geometry, normalize, plan_geometry, resize_and_crop


@dataclass(frozen=True)
class PrepareSpec:
    """What preparing the images of one request depends on.

    Attributes:
        recipe: The model's preprocessing recipe.
        resolution: The request's resolution, a patch multiple.
        crop: ``center`` or ``none``.
        patch_size: The model's patch size.
        num_heads: The model's attention heads (for the attention budget).
        max_side: Longest processed side allowed for ``crop=none``.
        max_image_pixels: Largest stored ``width * height`` decoded.
        jpeg_draft: Decode large JPEGs at a reduced scale (``DINO_JPEG_DRAFT``).
        max_attention_bytes: ``DINO_MAX_BATCH_ATTENTION_BYTES``.
    """

    recipe: PreprocessingRecipe
    resolution: int
    crop: Crop
    patch_size: int
    num_heads: int
    max_side: int
    max_image_pixels: int
    jpeg_draft: bool
    max_attention_bytes: int


@dataclass(frozen=True)
class Resized:
    """One image at the model's input size, before normalisation.

    Attributes:
        rgb: ``[height, width, 3]`` uint8, C-contiguous.
        original_size: The image's displayed ``(width, height)``.
        processed_size: ``(width, height)`` fed to the model.
        decode_s: Seconds spent decoding.
        resize_s: Seconds spent planning, resizing and cropping.
    """

    rgb: np.ndarray
    original_size: tuple[int, int]
    processed_size: tuple[int, int]
    decode_s: float
    resize_s: float


@dataclass(frozen=True)
class Prepared:
    """One image ready for the batcher.

    Attributes:
        pixels: ``[3, height, width]`` float32 ``pixel_values``.
        original_size: The image's displayed ``(width, height)``.
        processed_size: ``(width, height)`` of ``pixels``.
        decode_s: Seconds spent decoding.
        preprocess_s: Seconds spent resizing, cropping and normalising.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    processed_size: tuple[int, int]
    decode_s: float
    preprocess_s: float


def resize_image(data: bytes, index: int, spec: PrepareSpec) -> Resized:
    """Decode one uploaded image and bring it to the model's input size.

    Args:
        data: The file's bytes.
        index: Position of the image in the request, carried into errors.
        spec: The request's preparation settings.

    Returns:
        The 8-bit pixels and the sizes.

    Raises:
        ServiceError: A client error from decoding (:func:`service.decode.decode_reduced`) or
            an image over the attention budget (:class:`service.errors.TooManyTokensError`).
    """
    started = time.perf_counter()
    plan = functools.partial(_plan, spec=spec)
    image, original = decode_reduced(
        data,
        max_pixels=spec.max_image_pixels,
        needed=functools.partial(_needed_size, plan) if spec.jpeg_draft else None,
        index=index,
    )
    decoded = time.perf_counter()
    geometry = plan(*original)
    if image.size != original and geometry.source_box is not None:  # a reduced JPEG decode
        sx, sy = image.width / original[0], image.height / original[1]
        left, top, right, bottom = geometry.source_box
        box = (left * sx, top * sy, right * sx, bottom * sy)
        geometry = dataclasses.replace(geometry, source_box=box)
    check_attention_budget(
        geometry.size,
        patch_size=spec.patch_size,
        num_heads=spec.num_heads,
        budget=spec.max_attention_bytes,
        index=index,
        center_side=spec.resolution if spec.crop == "none" else None,
    )
    rgb = np.ascontiguousarray(np.asarray(resize_and_crop(image, geometry, spec.recipe)))
    return Resized(rgb, original, geometry.size, decoded - started, time.perf_counter() - decoded)


def finish(resized: Resized, recipe: PreprocessingRecipe) -> Prepared:
    """Normalise resized pixels; the time it takes counts as preprocessing."""
    started = time.perf_counter()
    pixels = normalize(resized.rgb, recipe)
    preprocess_s = resized.resize_s + time.perf_counter() - started
    return Prepared(
        pixels, resized.original_size, resized.processed_size, resized.decode_s, preprocess_s
    )


def prepare_image(data: bytes, index: int, spec: PrepareSpec) -> Prepared:
    """Decode and preprocess one image in the calling thread.

    Raises:
        ServiceError: As :func:`resize_image`.
    """
    return finish(resize_image(data, index, spec), spec.recipe)


def _plan(width: int, height: int, *, spec: PrepareSpec) -> Geometry:
    return plan_geometry(
        width,
        height,
        recipe=spec.recipe,
        resolution=spec.resolution,
        crop=spec.crop,
        patch_size=spec.patch_size,
        max_side=spec.max_side,
    )


def _needed_size(
    plan: Callable[[int, int], Geometry], width: int, height: int
) -> tuple[float, float]:
    """The smallest whole-image size that the resize of ``plan`` reads at full detail."""
    geometry = plan(width, height)
    if geometry.source_box is None:
        return geometry.resized
    left, top, right, bottom = geometry.source_box  # resized straight to ``size``
    return width * geometry.size[0] / (right - left), height * geometry.size[1] / (bottom - top)
