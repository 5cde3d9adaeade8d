"""Training images: a folder (ImageFolder layout or flat, recursive) or Fashion-MNIST IDX files.

Unreadable or truncated files never stop a run: the dataset substitutes the next readable image
and reports the bad path and why with the sample, so the training loop can warn once per file
and count them (worker processes cannot share a counter). Images over a pixel limit are refused
from their header, before any pixel is decoded. The folder scan visits every real folder once
(symlinked folders are followed, loops are not), skips hidden files and folders and anything
that is not a regular file, and warns about folders it cannot read; a long scan (a large or
networked folder) logs its progress.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError
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
Skipped = tuple[tuple[str, str], ...]  # (path, reason) of the files an item passed over


class DataError(ValueError):
    """The data source is missing, empty or malformed (a user mistake)."""


# PIL's own threshold for a decompression-bomb warning (it refuses twice as many pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
# Errors of the moment (I/O, file-table limits, NFS), not of the file: not remembered as bad.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.ESTALE}
)
_TRANSIENT_TRIES = 3  # failures of the moment before a file is given up on all the same
# What a bad file raises while it is opened and decoded.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageTooLargeError(ValueError):
    """An image with more pixels than allowed (refused before decoding)."""


def find_images(root: Path, report_every_s: float = 10.0) -> list[Path]:
    """Image files under ``root``, recursively, sorted.

    Symlinked folders are followed, but each real folder is visited once, so a link loop (or a
    second link to the same folder) neither hangs the scan nor repeats its images. Hidden files
    and folders (names starting with a dot) and entries that are not regular files (pipes,
    sockets, devices) are left out; a folder that cannot be read is named in a warning.

    Args:
        root: The folder to scan.
        report_every_s: A scan that takes longer logs (INFO) its count so far at this interval,
            and its total at the end; a shorter one logs nothing.

    Returns:
        The image paths, sorted.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [root]
    started = time.monotonic()
    last_report: float | None = None  # when progress was last logged (None: not yet)

    def report_progress() -> None:
        nonlocal last_report
        now = time.monotonic()
        if now - (started if last_report is None else last_report) >= report_every_s:
            last_report = now
            logger.info(
                "scanning %s: %d images in %d folders so far (%.0f s)",
                root, len(found), len(seen), now - started,
            )  # fmt: skip

    while pending:
        report_progress()
        folder = pending.pop()
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            logger.warning("cannot read the folder %s (%s); its images are left out", folder, err)
            continue
        subfolders = []
        for position, entry in enumerate(entries, 1):
            if position % 4096 == 0:  # a flat folder of a million files reports too
                report_progress()
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    subfolders.append(Path(entry.path))
                elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(Path(entry.path))
            except OSError:  # a dangling or looping link: as unreadable as it gets, skip it
                continue
        # Depth first in name order, so which name of a folder linked twice is kept does not
        # depend on the file system's listing order.
        pending.extend(reversed(subfolders))
    if last_report is not None:  # a long scan: say where it ended
        logger.info(
            "scanned %s: %d images in %d folders (%.0f s)",
            root, len(found), len(seen), time.monotonic() - started,
        )  # fmt: skip
    return sorted(found)


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully and convert it to 8-bit RGB.

    16-bit greyscale is scaled to 8 bits (``convert("RGB")`` alone would clip it to white), as
    the service does.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels, from the header (0: PIL's own hard limit,
            twice :data:`DEFAULT_MAX_IMAGE_PIXELS`, still applies).

    Raises:
        ImageTooLargeError: Over ``max_pixels``.
        OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError: Unreadable,
            truncated, not a regular file, or over PIL's limit.
    """
    # Non-blocking open: opening a named pipe for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size == 0:
            raise ValueError("empty file (0 bytes)")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        with warnings.catch_warnings():  # the size is checked here, with the limit in force
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(handle)
            except UnidentifiedImageError:  # its own text names the file descriptor only
                raise UnidentifiedImageError(
                    "not an image, or in a format Pillow cannot read"
                ) from None
        with img:
            width, height = img.size
            if max_pixels and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (pretrain's --max_image_pixels)"
                )
            img.load()
            return _to_rgb(img)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # round(v * 255 / 65535) in integers (65535 = 255 * 257 leaves no ties).
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        values = (values * 255 + 32767) // 65535
        return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


_LOAD_RGB_REFUSALS = ("not a regular file", "empty file (0 bytes)")


def _failure(err: BaseException) -> tuple[str, str]:
    """What is wrong with an unreadable file: a kind in a few words shared by files alike (for
    a count per kind: ``not an image``, ``too many pixels``, ``permission denied`` ...) and
    the error's own text where it says more than the kind (else empty)."""
    if isinstance(err, ImageTooLargeError | Image.DecompressionBombError):
        return "too many pixels", _reason(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image", _reason(err)
    if isinstance(err, OSError) and err.strerror:  # its text names the file again
        return err.strerror.lower(), ""
    if isinstance(err, ValueError) and str(err) in _LOAD_RGB_REFUSALS:
        return str(err), ""
    return "damaged or cut short", _reason(err)


def _unreadable_summary(failures: dict[int, tuple[str, str]], paths: Sequence[Path]) -> str:
    """``3 not an image (e.g. a.jpg: UnidentifiedImageError: ...), 1 permission denied (e.g.
    b.png)`` from ``failures`` (position -> kind, detail), the most frequent kind first."""
    by_kind: dict[str, list[int]] = {}
    for position in sorted(failures):
        by_kind.setdefault(failures[position][0], []).append(position)
    ranked = sorted(by_kind.items(), key=lambda item: -len(item[1]))
    parts = [
        f"{len(positions)} {kind} (e.g. {paths[positions[0]]}"
        + (f": {failures[positions[0]][1]})" if failures[positions[0]][1] else ")")
        for kind, positions in ranked[:3]
    ]
    others = sum(len(positions) for _, positions in ranked[3:])
    if others:
        parts.append(f"{others} for other reasons")
    return ", ".join(parts)


class ImageFolderDataset(Dataset[tuple[Any, Skipped]]):
    """All images under a folder; labels are ignored (self-supervised).

    Each item is ``(transform(image), bad)`` where ``bad`` lists the ``(path, reason)`` of the
    files that were skipped to reach a readable one (usually empty). A file found bad is
    remembered by the process (each loader worker has its own memory) and not tried again, so
    a folder of bad files costs one attempt per file, not one per item that passes by it (an
    error of the moment, such as EIO or a stale NFS handle, is given three tries).

    Args:
        root: Folder to scan recursively.
        transform: Applied to the RGB PIL image.
        max_image_pixels: Images with more pixels are skipped (see :func:`load_rgb`).

    Raises:
        DataError: The folder is missing or holds no images.
    """

    def __init__(
        self, root: Path, transform: Transform, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> None:
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
        self.max_image_pixels = max_image_pixels
        self._known_bad: set[int] = set()
        self._transient: Counter[int] = Counter()
        self._failures: dict[int, tuple[str, str]] = {}  # position -> (kind, detail), last

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, Skipped]:
        bad: list[tuple[str, str]] = []
        count = len(self.paths)
        for offset in range(count):
            position = (index + offset) % count
            if position in self._known_bad:
                continue  # reported when it was found
            path = self.paths[position]
            try:
                image = load_rgb(path, self.max_image_pixels)
            except UNREADABLE_ERRORS as err:
                transient = isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS
                if transient:  # tried again later, a few times: EIO may also be for good
                    self._transient[position] += 1
                if not transient or self._transient[position] >= _TRANSIENT_TRIES:
                    self._known_bad.add(position)
                self._failures[position] = _failure(err)
                bad.append((str(path), _reason(err)))
                continue
            self._failures.pop(position, None)  # read now (an error of the moment passed)
            return self.transform(image), tuple(bad)
        raise DataError(
            f"none of the {count} images under {self.root} is readable: "
            f"{_unreadable_summary(self._failures, self.paths)}"
        )


def _read_idx(path: Path, magic: int, dims: int) -> npt.NDArray[np.uint8]:
    """The uint8 payload of a gzipped IDX file, its header checked (``magic`` and ``dims``)."""
    try:
        with gzip.open(path) as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as err:  # missing, cut short, corrupt
        raise DataError(
            f"cannot read Fashion-MNIST file {path}: {err} (reinstall dataset-fashion-mnist or "
            "download the file again)"
        ) from None
    header = 4 + 4 * dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(
            f"{path} is not a Fashion-MNIST IDX file (expected magic number {magic:#010x} and "
            f"a {header}-byte header); reinstall dataset-fashion-mnist or download it again"
        )
    sizes = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    payload = np.frombuffer(data, np.uint8, offset=header)
    if payload.size != int(np.prod(sizes)):
        raise DataError(
            f"{path} is cut short or padded: its header announces {'x'.join(map(str, sizes))} "
            f"values, it holds {payload.size}; reinstall dataset-fashion-mnist or download it again"
        )
    return payload


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
    images = _read_idx(root / images_name, magic=0x803, dims=3)  # [N, 28, 28] uint8
    labels = _read_idx(root / labels_name, magic=0x801, dims=1).astype(np.int64)
    if images.size != labels.size * 28 * 28:
        raise DataError(f"Fashion-MNIST {split} files in {root} do not match ({images.size} bytes)")
    return images.reshape(-1, 28, 28), labels


class ArrayImageDataset(Dataset[tuple[Any, Skipped]]):
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

    def __getitem__(self, index: int) -> tuple[Any, Skipped]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return self.transform(image), ()


def build_dataset(
    data_path: str, transform: Transform, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Dataset[tuple[Any, Skipped]]:
    """Dataset for ``--data_path``: ``fashion-mnist:train|test`` or an image folder.

    Raises:
        DataError: The source is missing or empty.
    """
    if data_path.startswith(FASHION_MNIST_PREFIX):
        images, _ = read_fashion_mnist(data_path[len(FASHION_MNIST_PREFIX) :])
        return ArrayImageDataset(images, transform)
    return ImageFolderDataset(Path(data_path), transform, max_image_pixels)


def collate_crops(
    batch: Sequence[tuple[list[Tensor], Skipped]],
) -> tuple[list[Tensor], list[tuple[str, str]]]:
    """Stack crop lists into crop-major ``[B, 3, H, W]`` tensors; gather the skipped paths."""
    ncrops = len(batch[0][0])
    crops = [torch.stack([sample[0][i] for sample in batch]) for i in range(ncrops)]
    bad = [path for _, paths in batch for path in paths]
    return crops, bad


def canvas_transform(size: int | None) -> Transform:
    """PIL RGB image -> uint8 ``[3, S, S]`` canvas for the batched device-side augmentation.

    The shorter side is resized to ``size`` (PIL bicubic, antialiased; an image more than 4
    times longer than wide, or the reverse, first loses a random part of its longer side, so the
    resize stays small) and a random ``size x size`` square is cut (torch's RNG, seeded per
    worker and epoch). ``None`` keeps the image as it is (for sources whose images all share
    one size, such as Fashion-MNIST).
    """
    steps: list[Any] = []
    if size is not None:
        steps = [
            _limit_aspect,
            v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomCrop(size),
        ]
    transform: Transform = v2.Compose([*steps, v2.PILToTensor()])
    return transform


# Before the shorter-side resize of a canvas, a longer side beyond this many times the shorter
# one is cut (a random window): a 100000x2 strip would otherwise be resized to 11 million x 224.
_MAX_CANVAS_ASPECT = 4


def _limit_aspect(image: Image.Image) -> Image.Image:
    width, height = image.size
    if width > _MAX_CANVAS_ASPECT * height:
        keep = _MAX_CANVAS_ASPECT * height
        left = int(torch.randint(0, width - keep + 1, ()))
        return image.crop((left, 0, left + keep, height))
    if height > _MAX_CANVAS_ASPECT * width:
        keep = _MAX_CANVAS_ASPECT * width
        top = int(torch.randint(0, height - keep + 1, ()))
        return image.crop((0, top, width, top + keep))
    return image


def collate_canvases(
    batch: Sequence[tuple[Tensor, Skipped]],
) -> tuple[Tensor, list[tuple[str, str]]]:
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
