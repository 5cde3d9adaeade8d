"""The ONNX feature contract shared by the exporter and the service.

This module is the single definition of the model's input and output names, dtypes and axes,
the metadata keys written into ``metadata_props``, the preprocessing recipe, the synthetic
reference images used for load-time self-checks, and the model repository layout.

It imports only the standard library: the service imports it without pulling in torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTRACT_VERSION = "1"
ONNX_OPSET = 17

IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, as in DINO
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# DINO's evaluation transform: Resize(256) then CenterCrop(224), i.e. a crop ratio of 224/256.
EVAL_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the ONNX graph.

    Attributes:
        name: Tensor name in the graph, in JSON responses and in code.
        dtype: numpy dtype name of the fp32 export ("float32").
        axes: Axis names; strings are dynamic axes, integers are fixed sizes.
    """

    name: str
    dtype: str
    axes: tuple[str | int, ...]

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.axes)

    def dynamic_axes(self) -> dict[int, str]:
        """Map of axis index to symbolic name for every dynamic axis."""
        return {i: a for i, a in enumerate(self.axes) if isinstance(a, str)}


PIXEL_VALUES = TensorSpec("pixel_values", "float32", ("batch", 3, "height", "width"))
CLS_EMBEDDING = TensorSpec("cls_embedding", "float32", ("batch", "embed_dim"))
PATCH_FEATURES = TensorSpec("patch_features", "float32", ("batch", "num_patches", "embed_dim"))
ATTENTION_MAPS = TensorSpec("attention_maps", "float32", ("batch", "num_heads", "num_patches"))

INPUTS: tuple[TensorSpec, ...] = (PIXEL_VALUES,)
# The order is the order of the exported graph's outputs and of the export wrapper's tuple.
OUTPUTS: tuple[TensorSpec, ...] = (CLS_EMBEDDING, PATCH_FEATURES, ATTENTION_MAPS)
OUTPUT_NAMES: tuple[str, ...] = tuple(spec.name for spec in OUTPUTS)

# Axes that the export must leave dynamic (the others follow from the model).
DYNAMIC_INPUT_AXES: dict[str, dict[int, str]] = {
    PIXEL_VALUES.name: {0: "batch", 2: "height", 3: "width"},
}
DYNAMIC_OUTPUT_AXES: dict[str, dict[int, str]] = {
    CLS_EMBEDDING.name: {0: "batch"},
    PATCH_FEATURES.name: {0: "batch", 1: "num_patches"},
    ATTENTION_MAPS.name: {0: "batch", 2: "num_patches"},
}


class MetadataKey:
    """Keys of the ONNX ``metadata_props`` written by the export and read by the service."""

    CONTRACT_VERSION = "dino.contract_version"
    ARCH = "dino.arch"
    PATCH_SIZE = "dino.patch_size"
    EMBED_DIM = "dino.embed_dim"
    DEPTH = "dino.depth"
    NUM_HEADS = "dino.num_heads"
    RESOLUTION = "dino.default_resolution"
    IMAGE_MEAN = "dino.image_mean"
    IMAGE_STD = "dino.image_std"
    PREPROCESSING = "dino.preprocessing"
    WEIGHTS_SHA256 = "dino.weights_sha256"
    REFERENCE = "dino.reference_outputs"
    PRECISION = "dino.precision"
    SOURCE = "dino.source"

    REQUIRED: tuple[str, ...] = (
        CONTRACT_VERSION,
        ARCH,
        PATCH_SIZE,
        EMBED_DIM,
        DEPTH,
        NUM_HEADS,
        RESOLUTION,
        IMAGE_MEAN,
        IMAGE_STD,
        PREPROCESSING,
        WEIGHTS_SHA256,
        REFERENCE,
        PRECISION,
    )


@dataclass(frozen=True)
class PreprocessingRecipe:
    """How an image becomes ``pixel_values`` (DINO's evaluation transform by default).

    Attributes:
        resolution: Side of the square centre crop, a multiple of the patch size.
        resize_size: Shorter side after the resize that precedes the centre crop.
        interpolation: PIL resampling filter name used for every resize.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided after the mean.
    """

    resolution: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    @classmethod
    def for_resolution(cls, resolution: int) -> PreprocessingRecipe:
        """The DINO evaluation recipe (resize to res/0.875, centre crop res) at ``resolution``."""
        return cls(resolution=resolution, resize_size=resize_for_crop(resolution))

    def to_json(self) -> str:
        """Serialise for ``metadata_props``."""
        return json.dumps(
            {
                "color": "RGB",
                "resize": "shorter_side",
                "resize_size": self.resize_size,
                "crop": "center",
                "resolution": self.resolution,
                "interpolation": self.interpolation,
                "scale": 1 / 255,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PreprocessingRecipe:
        """Parse the JSON written by :meth:`to_json`.

        Raises:
            ValueError: The text is not a valid recipe.
        """
        try:
            data = json.loads(text)
            mean = tuple(float(v) for v in data["mean"])
            std = tuple(float(v) for v in data["std"])
            recipe = cls(
                resolution=int(data["resolution"]),
                resize_size=int(data["resize_size"]),
                interpolation=str(data["interpolation"]),
                mean=(mean[0], mean[1], mean[2]),
                std=(std[0], std[1], std[2]),
            )
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RecursionError) as err:
            raise ValueError(f"invalid preprocessing recipe {text[:200]!r}: {err}") from err
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"invalid preprocessing recipe {text[:200]!r}: mean/std need 3 values")
        return recipe


def resize_for_crop(resolution: int) -> int:
    """Shorter-side resize that precedes a centre crop of ``resolution`` (256 for 224)."""
    return int(round(resolution / EVAL_CROP_RATIO))


@dataclass(frozen=True)
class CenterCropPlan:
    """Where DINO's evaluation transform (resize the shorter side, centre crop) samples.

    Attributes:
        resized: ``(width, height)`` after resizing the shorter side, the longer side truncated
            to an integer (torchvision's ``Resize(int)`` on PIL images).
        crop_box: ``(left, top, right, bottom)`` of the centre crop in the resized image,
            offsets rounded as torchvision's ``CenterCrop``.
        source_box: The same crop in source coordinates when the resized image would exceed
            the pixel budget (extreme aspect ratios, such as a 1 x 100000 strip): resizing
            only that region (Pillow's ``resize(box=...)``) samples at the same positions with
            memory bounded by the crop. None when the resized image is built in full.
    """

    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    source_box: tuple[float, float, float, float] | None


def plan_center_crop(
    width: int, height: int, *, resize_size: int, resolution: int, max_pixels: int
) -> CenterCropPlan:
    """Plan the evaluation transform of a ``width x height`` image.

    Args:
        width: Source width.
        height: Source height.
        resize_size: Target of the shorter side.
        resolution: Side of the square crop.
        max_pixels: Largest resized (pre-crop) image built in full.

    Returns:
        The plan.
    """
    if width <= height:
        resized = (resize_size, int(resize_size * height / width))
    else:
        resized = (int(resize_size * width / height), resize_size)
    left = int(round((resized[0] - resolution) / 2.0))
    top = int(round((resized[1] - resolution) / 2.0))
    box = (left, top, left + resolution, top + resolution)
    inside = left >= 0 and top >= 0 and box[2] <= resized[0] and box[3] <= resized[1]
    source_box = None
    if resized[0] * resized[1] > max_pixels and inside:
        scale_x, scale_y = width / resized[0], height / resized[1]
        source_box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
    return CenterCropPlan(resized=resized, crop_box=box, source_box=source_box)


# ---------------------------------------------------------------------------------------------
# Synthetic reference images: the export records the model's outputs on them, the service
# re-computes them through its own decode/preprocess/inference path at load time.

REFERENCE_CASES: tuple[tuple[int, int], ...] = ((320, 240), (180, 260))  # (width, height)
REFERENCE_MAX_ABS_ERROR = {"float32": 2e-3, "float16": 5e-2}
REFERENCE_MIN_COSINE = {"float32": 0.9999, "float16": 0.999}


def reference_image_rgb(case: int) -> tuple[int, int, bytes]:
    """A deterministic synthetic RGB image with smooth gradients, stripes and a blob.

    Args:
        case: Index into :data:`REFERENCE_CASES`.

    Returns:
        ``(width, height, data)`` where ``data`` holds ``height*width*3`` bytes, row-major RGB.
    """
    width, height = REFERENCE_CASES[case]
    out = bytearray(width * height * 3)
    cx, cy = 0.4 * width + 17 * case, 0.55 * height
    radius = 0.25 * min(width, height)
    i = 0
    for y in range(height):
        for x in range(width):
            inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
            r = (x * 255) // max(width - 1, 1)
            g = (y * 255) // max(height - 1, 1)
            b = 255 if ((x // (7 + case) + y // 11) % 2) else 30
            if inside:
                r, g, b = 240 - g // 2, 40 + (r // 3), 60
            out[i] = r
            out[i + 1] = g
            out[i + 2] = b
            i += 3
    return width, height, bytes(out)


def reference_metadata(
    *, resolution: int, cls_embeddings: list[list[float]], precision: str
) -> str:
    """Serialise the reference outputs recorded at export time."""
    return json.dumps(
        {
            "resolution": resolution,
            "crop": "center",
            "cases": [
                {"case": i, "size": list(REFERENCE_CASES[i]), CLS_EMBEDDING.name: emb}
                for i, emb in enumerate(cls_embeddings)
            ],
            # rounding grows with the values' size: relative above magnitude 1
            "max_abs_error": REFERENCE_MAX_ABS_ERROR[precision]
            * max([1.0, *(abs(v) for emb in cls_embeddings for v in emb)]),
            "min_cosine": REFERENCE_MIN_COSINE[precision],
        }
    )


def parse_reference_metadata(text: str) -> dict[str, Any]:
    """Parse :func:`reference_metadata` output.

    Raises:
        ValueError: The text is not valid reference metadata.
    """
    try:
        data = json.loads(text)
        cases = data["cases"]
        for case in cases:
            emb = case[CLS_EMBEDDING.name]
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in emb):
                raise ValueError("non-finite reference value")
        float(data["max_abs_error"])
        float(data["min_cosine"])
        int(data["resolution"])
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as err:
        raise ValueError(f"invalid reference outputs metadata: {err}") from err
    if not isinstance(data, dict):
        raise ValueError("invalid reference outputs metadata: not an object")
    return data


# ---------------------------------------------------------------------------------------------
# Model repository: model_repository/<name>/<version>/model.onnx (Triton's layout).

MODEL_FILENAME = "model.onnx"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise ValueError.

    A name of digits only is refused: it reads as a version folder (``<name>/1/1/model.onnx``
    from a path that ended in a version instead of the model's folder).
    """
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:  # fullmatch: "$" allows a "\n"
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (no slashes)"
        )
    if name.isdigit():
        raise ValueError(
            f"invalid model name {name!r}: digits only name a version folder; give the model's "
            "folder (model_repository/<name>), not one of its versions"
        )
    return name


def model_versions(repository: Path, name: str) -> list[int]:
    """Versions of ``name`` in ``repository`` that hold a model file, ascending.

    Only directories whose name is a positive integer count, and only when
    ``<version>/model.onnx`` exists (writers create it by an atomic rename, so its presence
    means the file is complete). A version folder that cannot be looked into (permissions), and
    a ``model.onnx`` that is a broken symbolic link, count too, so that whoever loads it reports
    why it cannot be read.

    Raises:
        OSError: The model's folder cannot be looked into or listed (permissions).
    """
    root = Path(repository) / validate_model_name(name)
    if not root.is_dir():
        return []
    versions = []
    for child in root.iterdir():
        version = version_number(child.name)
        if version is not None and _holds_model(child):
            versions.append(version)
    return sorted(versions)


def ignored_version_folders(repository: Path, name: str) -> dict[str, str]:
    """Entries of ``name``'s folder that look like versions but are not read, and why.

    A name made of digits that is not a canonical version number (``02``, ``0``, a number
    beyond :data:`MAX_VERSION`) is ignored by :func:`model_versions`; listing it lets the
    service say so instead of ignoring a folder someone meant as a version.

    Raises:
        OSError: The model's folder cannot be listed (permissions).
    """
    root = Path(repository) / validate_model_name(name)
    if not root.is_dir():
        return {}
    ignored = {}
    for child in root.iterdir():
        if child.name.lstrip("+-").isdigit():  # numbers, in any script, not e.g. "2.old"
            problem = _version_name_problem(child.name)
            if problem is not None:
                ignored[child.name] = problem
    return ignored


# Version numbers stay exact in every JSON client (JavaScript numbers are doubles).
MAX_VERSION = 2**53 - 1


def version_number(folder_name: str) -> int | None:
    """The version a folder name stands for ("7" -> 7), or None if it names no version."""
    return int(folder_name) if _version_name_problem(folder_name) is None else None


def _version_name_problem(folder_name: str) -> str | None:
    """None when ``folder_name`` is a version number, else why it is not one."""
    if not (folder_name.isascii() and folder_name.isdigit()):
        return "a version folder is named with ASCII digits only"
    if str(int(folder_name)) != folder_name:  # model_path reads "2/", never "02/"
        return f"write the version without leading zeros ({int(folder_name)})"
    if int(folder_name) == 0:
        return "versions start at 1"
    if int(folder_name) > MAX_VERSION:
        return f"versions are at most {MAX_VERSION} (2**53 - 1, exact in JSON clients)"
    return None


def _holds_model(version_dir: Path) -> bool:
    """Whether ``version_dir/model.onnx`` is a file, a symbolic link that does not lead to one
    (dangling, or a loop: whoever loads it says so), or cannot be checked (no permission)."""
    candidate = version_dir / MODEL_FILENAME
    try:
        return candidate.is_file() or (candidate.is_symlink() and not candidate.exists())
    except PermissionError:
        return True
    except OSError:
        return False


def model_path(repository: Path, name: str, version: int) -> Path:
    """Path of the model file of one version."""
    return Path(repository) / validate_model_name(name) / str(version) / MODEL_FILENAME
