"""Training images: a folder (ImageFolder layout or flat, recursive) or Fashion-MNIST IDX files.

Unreadable or truncated files never stop a run: the dataset substitutes the next readable image
and reports the bad path with the sample, so the training loop can warn once per file and count
them (worker processes cannot share a counter).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
FASHION_MNIST_ENV = "DINO_FASHION_MNIST_ROOT"
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_PREFIX = "fashion-mnist:"

Transform = Callable[[Image.Image], Any]


class DataError(ValueError):
    """The data source is missing, empty or malformed (a user mistake)."""


def find_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted, following symlinked folders."""
    found = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully and convert it to RGB (raises on unreadable or truncated files)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFolderDataset(Dataset[tuple[Any, tuple[str, ...]]]):
    """All images under a folder; labels are ignored (self-supervised).

    Each item is ``(transform(image), bad_paths)`` where ``bad_paths`` lists the files that
    were skipped to reach a readable one (usually empty).

    Args:
        root: Folder to scan recursively.
        transform: Applied to the RGB PIL image.

    Raises:
        DataError: The folder is missing or holds no images.
    """

    def __init__(self, root: Path, transform: Transform) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist or is not a directory")
        self.root = root
        self.paths = find_images(root)
        if not self.paths:
            raise DataError(
                f"no images found under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, tuple[str, ...]]:
        bad: list[str] = []
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                image = load_rgb(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                logger.debug("unreadable image %s: %s", path, err)
                bad.append(str(path))
                continue
            return self.transform(image), tuple(bad)
        raise DataError(f"none of the {len(self.paths)} images under {self.root} is readable")


def _read_idx(path: Path, offset: int) -> npt.NDArray[np.uint8]:
    try:
        with gzip.open(path) as handle:
            data = handle.read()
    except OSError as err:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {err}") from err
    return np.frombuffer(data, np.uint8, offset=offset)


def fashion_mnist_root() -> Path:
    """Folder of the IDX files (``$DINO_FASHION_MNIST_ROOT`` or the Debian package's)."""
    return Path(os.environ.get(FASHION_MNIST_ENV, str(FASHION_MNIST_ROOT)))


def read_fashion_mnist(
    split: str, root: Path | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` of a Fashion-MNIST split.

    Raises:
        DataError: Unknown split or missing/malformed files.
    """
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use train or test")
    root = root or fashion_mnist_root()
    images_name, labels_name = FASHION_MNIST_FILES[split]
    if not (root / images_name).is_file():
        raise DataError(
            f"Fashion-MNIST not found in {root}: install it with "
            f"`apt-get install -y dataset-fashion-mnist` or set ${FASHION_MNIST_ENV}"
        )
    images = _read_idx(root / images_name, 16)
    labels = _read_idx(root / labels_name, 8).astype(np.int64)
    if images.size != labels.size * 28 * 28:
        raise DataError(f"Fashion-MNIST {split} files in {root} do not match ({images.size} bytes)")
    return images.reshape(-1, 28, 28), labels


class ArrayImageDataset(Dataset[tuple[Any, tuple[str, ...]]]):
    """Grayscale uint8 images held in memory, served as RGB PIL images.

    Args:
        images: ``[N, H, W]`` uint8.
        transform: Applied to the RGB PIL image.
    """

    def __init__(self, images: npt.NDArray[np.uint8], transform: Transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, tuple[str, ...]]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return self.transform(image), ()


def build_dataset(data_path: str, transform: Transform) -> Dataset[tuple[Any, tuple[str, ...]]]:
    """Dataset for ``--data_path``: ``fashion-mnist:train|test`` or an image folder.

    Raises:
        DataError: The source is missing or empty.
    """
    if data_path.startswith(FASHION_MNIST_PREFIX):
        images, _ = read_fashion_mnist(data_path[len(FASHION_MNIST_PREFIX) :])
        return ArrayImageDataset(images, transform)
    return ImageFolderDataset(Path(data_path), transform)


def collate_crops(
    batch: Sequence[tuple[list[Tensor], tuple[str, ...]]],
) -> tuple[list[Tensor], list[str]]:
    """Stack crop lists into crop-major ``[B, 3, H, W]`` tensors; gather the skipped paths."""
    ncrops = len(batch[0][0])
    crops = [torch.stack([sample[0][i] for sample in batch]) for i in range(ncrops)]
    bad = [path for _, paths in batch for path in paths]
    return crops, bad


def canvas_transform(size: int | None) -> Transform:
    """PIL RGB image -> uint8 ``[3, S, S]`` canvas for the batched device-side augmentation.

    The shorter side is resized to ``size`` (PIL bicubic, antialiased) and a random
    ``size x size`` square is cut (torch's RNG, seeded per worker and epoch). ``None`` keeps the
    image as it is (for sources whose images all share one size, such as Fashion-MNIST).
    """
    steps: list[Any] = []
    if size is not None:
        steps = [
            v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomCrop(size),
        ]
    transform: Transform = v2.Compose([*steps, v2.PILToTensor()])
    return transform


def collate_canvases(
    batch: Sequence[tuple[Tensor, tuple[str, ...]]],
) -> tuple[Tensor, list[str]]:
    """Stack uint8 canvases into ``[B, 3, H, W]``; gather the skipped paths.

    Raises:
        DataError: The canvases differ in size (a canvas size is needed for this source).
    """
    sizes = {tuple(sample[0].shape) for sample in batch}
    if len(sizes) > 1:
        raise DataError(
            f"images of different sizes {sorted(sizes)} in one batch; set --canvas_size"
        )
    canvases = torch.stack([sample[0] for sample in batch])
    bad = [path for _, paths in batch for path in paths]
    return canvases, bad
