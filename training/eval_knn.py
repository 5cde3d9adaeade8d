"""Weighted k-NN evaluation of CLS features: ``python -m training.eval_knn``.

As the reference ``eval_knn.py`` (Wu et al., 2018; Caron et al., 2021, Sec. 4.1): L2-normalised
CLS embeddings, cosine similarity to every training feature, the k nearest neighbours vote for
their label with weight ``exp(sim / T)``, T = 0.07, for k in {10, 20, 100, 200}. The reference's
quirks (fixed 1000 classes, crash below 100 test images) are fixed.

Features come from a training checkpoint (``--checkpoint``, teacher by default) or an exported
ONNX model (``--onnx``, preprocessing read from its metadata); images from Fashion-MNIST or an
ImageFolder train/val pair.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.contract import (
    CLS_EMBEDDING,
    DYNAMIC_INPUT_AXES,
    PIXEL_VALUES,
    MetadataKey,
    PreprocessingRecipe,
    plan_center_crop,
)
from models.files import new_temp_file, same_file
from training.data import (
    FASHION_MNIST_FILES,
    IMAGE_EXTENSIONS,
    UNREADABLE_ERRORS,
    DataError,
    fashion_mnist_root,
    find_images,
    load_rgb,
    read_fashion_mnist,
)

logger = logging.getLogger("training.eval_knn")

FloatArray = npt.NDArray[np.float32]
Extractor = Callable[[FloatArray], FloatArray]

EXACT_RESIZE_MAX_PIXELS = 8_000_000
"""Largest resized (pre-crop) image built in full; the service uses the same budget."""


@torch.no_grad()
def knn_classifier(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of the temperature-weighted k-NN vote.

    Args:
        train_features: ``[N, D]`` L2-normalised training features.
        train_labels: ``[N]`` integer labels.
        test_features: ``[M, D]`` L2-normalised test features.
        test_labels: ``[M]`` integer labels.
        k: Neighbours (clamped to N).
        temperature: Vote weights are ``exp(similarity / temperature)``.
        num_classes: Number of classes (default: from the labels).
        chunk_size: Test rows per similarity matrix.
    """
    k = min(k, len(train_features))
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    top1 = top5 = 0
    for start in range(0, len(test_features), chunk_size):
        features = test_features[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size]
        similarity = features @ train_features.T  # (b, N)
        distances, indices = similarity.topk(k, dim=1, largest=True, sorted=True)  # (b, k)
        neighbours = train_labels[indices]  # (b, k)
        # exp((sim - nearest) / T) in float64: the reference's weights times one factor per
        # test image, which leaves its ranking alone, cannot overflow at a small T and
        # underflows only where float32 would have overflowed first (T below 0.003).
        shifted = (distances - distances[:, :1]).double() / temperature
        weights = shifted.exp()
        votes = torch.zeros(len(features), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, neighbours, weights)  # (b, C)
        voted = torch.zeros(len(features), num_classes, dtype=torch.bool)
        voted.scatter_(1, neighbours, True)  # (b, C)
        # a voted class ranks above every unvoted one, even if its weights underflowed to 0
        predictions = votes.masked_fill(~voted, -math.inf).argsort(dim=1, descending=True)
        top1 += int((predictions[:, 0] == targets).sum())
        # A class no neighbour voted for is no prediction: the reference's 1000-class vote
        # matrix makes such a class all but never land in the top 5 of a 10-class problem.
        shortlist = predictions[:, : min(5, k)]  # (b, min(5, k))
        hits = (shortlist == targets[:, None]) & voted.gather(1, shortlist)
        top5 += int(hits.any(dim=1).sum())
    total = len(test_features)
    return 100.0 * top1 / total, 100.0 * top5 / total


def resize_and_crop(image: Image.Image, recipe: PreprocessingRecipe) -> Image.Image:
    """RGB, shorter side resized to ``recipe.resize_size`` (bicubic), centre ``R x R`` crop.

    As torchvision does it, except for extreme aspect ratios (a resized image over
    :data:`EXACT_RESIZE_MAX_PIXELS`): only the region that survives the crop is resized then,
    at the same sampling positions, so a 100000 x 1 strip costs the crop's memory, not 20 GB.
    """
    image = image.convert("RGB")
    res = recipe.resolution
    plan = plan_center_crop(
        image.width,
        image.height,
        resize_size=recipe.resize_size,
        resolution=res,
        max_pixels=EXACT_RESIZE_MAX_PIXELS,
    )
    if plan.source_box is not None:
        return image.resize((res, res), Image.Resampling.BICUBIC, box=plan.source_box)
    return image.resize(plan.resized, Image.Resampling.BICUBIC).crop(plan.crop_box)


def preprocess(image: Image.Image, recipe: PreprocessingRecipe) -> FloatArray:
    """Resize the shorter side (bicubic), centre-crop, scale to [0, 1], normalise: ``[3, R, R]``."""
    image = resize_and_crop(image, recipe)
    pixels: FloatArray = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (R, R, 3)
    mean, std = np.array(recipe.mean, np.float32), np.array(recipe.std, np.float32)
    normalised: FloatArray = ((pixels - mean) / std).astype(np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))  # (3, R, R)


def _check_resolution(resolution: int | None, patch_size: int) -> None:
    if resolution is not None and resolution < patch_size:
        raise DataError(
            f"--resolution {resolution} is smaller than the model's patch size {patch_size}"
        )


def torch_extractor(
    checkpoint: Path, checkpoint_key: str, resolution: int | None, num_heads: int | None = None
) -> tuple[Extractor, PreprocessingRecipe]:
    """CLS features of a checkpoint's backbone (teacher by default) on the CPU or GPU."""
    from models.checkpoint import load_backbone

    loaded = load_backbone(checkpoint, checkpoint_key=checkpoint_key, num_heads=num_heads)
    _check_resolution(resolution, loaded.config.patch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device).eval()
    recipe = PreprocessingRecipe.for_resolution(resolution or loaded.config.img_size)

    @torch.no_grad()
    def extract(batch: FloatArray) -> FloatArray:
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()  # type: ignore[no-any-return]

    return extract, recipe


def onnx_extractor(path: Path, resolution: int | None) -> tuple[Extractor, PreprocessingRecipe]:
    """CLS features of an exported model with onnxruntime; the recipe comes from its metadata."""
    import onnxruntime as ort

    if not path.is_file():
        raise DataError(f"--onnx {path}: no such file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's InvalidProtobuf/Fail/... derive from Exception
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if len(first) > 300:  # the reason comes last ("... Unsupported model IR version: 14")
            first = f"{first[:100]} ... {first[-190:]}"
        raise DataError(f"--onnx {path} is not a loadable ONNX model: {first}") from err
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [PIXEL_VALUES.name] or CLS_EMBEDDING.name not in outputs:
        raise DataError(
            f"--onnx {path} does not follow this project's contract: inputs {inputs}, outputs "
            f"{outputs} (expected the input {PIXEL_VALUES.name!r} and the output "
            f"{CLS_EMBEDDING.name!r})"
        )
    _check_dynamic_axes(path, session.get_inputs()[0].shape)
    metadata = session.get_modelmeta().custom_metadata_map
    if MetadataKey.PREPROCESSING not in metadata:
        raise DataError(f"{path} has no {MetadataKey.PREPROCESSING} metadata (not our export?)")
    recipe = PreprocessingRecipe.from_json(metadata[MetadataKey.PREPROCESSING])
    if metadata.get(MetadataKey.PATCH_SIZE, "").isdigit():
        _check_resolution(resolution, int(metadata[MetadataKey.PATCH_SIZE]))
    if resolution:
        recipe = PreprocessingRecipe.for_resolution(resolution)

    def extract(batch: FloatArray) -> FloatArray:
        (cls,) = session.run([CLS_EMBEDDING.name], {PIXEL_VALUES.name: batch})
        return np.asarray(cls, dtype=np.float32)

    return extract, recipe


def _check_dynamic_axes(path: Path, shape: Sequence[int | str | None]) -> None:
    """Refuse an input whose batch, height or width is fixed (a shape-fixing tool's output):
    batches of other sizes and other resolutions would fail in onnxruntime mid-run.

    Raises:
        DataError: The input's rank is not the contract's, or a dynamic axis has a size.
    """
    shown = "[" + ", ".join(str(size) for size in shape) + "]"
    dynamic = DYNAMIC_INPUT_AXES[PIXEL_VALUES.name]
    if len(shape) == PIXEL_VALUES.rank:
        fixed = [f"{name} {shape[i]}" for i, name in dynamic.items() if isinstance(shape[i], int)]
        if not fixed:
            return
        problem = f"a fixed {' and '.join(fixed)}"
    else:
        problem = f"rank {len(shape)}"
    axes = ", ".join(str(axis) for axis in PIXEL_VALUES.axes)
    raise DataError(
        f"--onnx {path}: its input {PIXEL_VALUES.name} has the shape {shown}, with {problem}; "
        f"the contract's is [{axes}] with {', '.join(dynamic.values())} dynamic (export the "
        "model again with python -m models.export)"
    )


@dataclass(frozen=True)
class Features:
    """What :func:`extract_features` returns.

    Attributes:
        vectors: ``[N, D]`` L2-normalised features of the images that could be read.
        kept: Their indices in the input list.
        item_shape: Shape of one prepared image (raw pixels: ``(H, W, 3)``), the same for all.
    """

    vectors: Tensor
    kept: list[int]
    item_shape: tuple[int, ...]


def extract_features(
    images: Sequence[Callable[[], Image.Image | None]],
    extract: Extractor,
    recipe: PreprocessingRecipe,
    batch_size: int,
    desc: str,
    prepare: Callable[[Image.Image], FloatArray] | None = None,
    source: str = "the model",
) -> Features:
    """L2-normalised features of the loadable images and the indices that were kept.

    ``prepare`` replaces the recipe's preprocessing (used for the raw-pixel baseline);
    ``source`` names the features' origin in the error on non-finite features.

    Raises:
        DataError: No image could be read, the prepared images differ in shape, or a feature
            is not finite (NaN or inf: normalised, it would still vote).
    """
    chunks: list[FloatArray] = []
    kept: list[int] = []
    first_shape: tuple[int, ...] = ()

    def batches() -> Iterator[tuple[FloatArray, list[int]]]:
        pixels: list[FloatArray] = []
        indices: list[int] = []
        for index, load in enumerate(images):
            image = load()
            if image is None:
                continue
            pixels.append(prepare(image) if prepare else preprocess(image, recipe))
            indices.append(index)
            if len(pixels) == batch_size:
                yield stack(pixels), indices
                pixels, indices = [], []
        if pixels:
            yield stack(pixels), indices

    total = (len(images) + batch_size - 1) // batch_size
    for batch, indices in tqdm(batches(), total=total, desc=desc, leave=False):
        if chunks and batch.shape[1:] != first_shape:
            raise DataError(_MIXED_SIZES)
        first_shape = batch.shape[1:]
        output = extract(batch)
        if not np.isfinite(output).all():
            raise DataError(
                f"{source} gives features that are not finite (NaN or inf) on the {desc} "
                "images (NaN or inf weights, or an overflow)"
            )
        chunks.append(output)
        kept.extend(indices)
    if not chunks:
        raise DataError(f"no readable images for {desc}")
    features = torch.from_numpy(np.concatenate(chunks)).float()
    return Features(torch.nn.functional.normalize(features, dim=1, p=2), kept, first_shape)


def stack(pixels: list[FloatArray]) -> FloatArray:
    """One batch; images of several sizes (raw pixels of a folder) are a user error.

    Raises:
        DataError: The arrays differ in shape.
    """
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise DataError(_MIXED_SIZES)
    return np.stack(pixels)


_MIXED_SIZES = (
    "the images have different sizes, so their raw pixels cannot be compared; pass "
    "--resolution R to resize and centre-crop them to R x R first"
)
# Side of the evaluation crop: memory grows with its square (and the attention with its fourth
# power); a typo such as 100000 must be refused, not killed by the kernel.
MAX_RESOLUTION = 2048


def _is_stdout(path: Path) -> bool:
    """Whether ``path`` is this process's standard output (``/dev/stdout`` redirected to a
    file, or that file by its name)."""
    try:
        mine = os.fstat(sys.stdout.fileno())
        theirs = os.stat(path)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed)
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _overwritten_input(output: Path, args: argparse.Namespace) -> str | None:
    """The input that writing ``output`` would destroy, in words; None when there is none.

    Inputs are the model file, the Fashion-MNIST files, and the images under ``--train_dir``
    and ``--val_dir`` (an output with an image's name there; the folders themselves are
    refused as directories).
    """
    files = [("the --checkpoint", args.checkpoint), ("the --onnx model", args.onnx)]
    if args.dataset:
        root = fashion_mnist_root()
        for names in FASHION_MNIST_FILES.values():
            files += [("the Fashion-MNIST file", root / name) for name in names]
    for what, path in files:
        if path is not None and same_file(output, path):
            return f"{what} {path}"
    if output.suffix.lower() in IMAGE_EXTENSIONS:
        real = Path(os.path.realpath(output))
        for flag, folder in (("--train_dir", args.train_dir), ("--val_dir", args.val_dir)):
            if folder is not None and real.is_relative_to(os.path.realpath(folder)):
                return f"an image of {flag} {folder}"
    return None


def _array_loader(array: npt.NDArray[np.uint8], index: int) -> Callable[[], Image.Image | None]:
    return lambda: Image.fromarray(array[index], mode="L").convert("RGB")


def _file_loader(path: Path) -> Callable[[], Image.Image | None]:
    def load() -> Image.Image | None:
        try:
            return load_rgb(path)
        except UNREADABLE_ERRORS as err:
            logger.warning("skipping unreadable image %s: %s", path, err)
            return None

    return load


def image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Images and labels of an ImageFolder layout (one subfolder per class).

    Args:
        root: The split's folder.
        classes: The training split's classes, when ``root`` is the evaluation split: labels
            are their indices, and a class folder of ``root`` that is not among them is an
            error (its images could never be classified right).

    Raises:
        DataError: Not a folder, no class subfolders, unknown classes or no images.
    """
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    # hidden folders (.ipynb_checkpoints, .git) are no classes, as find_images skips them
    own = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not own:
        raise DataError(f"{root} has no class subfolders (ImageFolder layout expected)")
    if classes is None:
        classes = own
    unknown = [name for name in own if name not in classes]
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DataError(
            f"{root} has class folders that the training split lacks: {shown} (training "
            f"classes: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}); "
            "both splits need the same class folder names"
        )
    # A file is labelled by the class folder that holds it: one reached through a link from
    # another class folder (a link to "..", say) is listed once, under its own class.
    real_root = root.resolve()

    def home(real: Path) -> str | None:
        try:
            parts = real.relative_to(real_root).parts
        except ValueError:  # a link out of the split: the first class that reaches it
            return None
        return parts[0] if len(parts) > 1 and parts[0] in own else None

    paths, labels = [], []
    seen: set[Path] = set()
    dropped = 0
    for label, name in enumerate(classes):
        for path in find_images(root / name) if (root / name).is_dir() else []:
            real = path.resolve()
            owner = home(real)
            if real in seen or (owner is not None and owner != name):
                dropped += 1
                continue
            seen.add(real)
            paths.append(path)
            labels.append(label)
    if dropped:
        logger.warning(
            "%d image(s) under %s are reachable from more than one class folder (through "
            "links); each is used once, labelled by the class folder that holds it",
            dropped,
            root,
        )
    if not paths:
        raise DataError(f"no images under {root}")
    return paths, labels, classes


def _limit(n: int, limit: int) -> int:
    return n if limit <= 0 else min(n, limit)


def _sample(count: int, limit: int) -> list[int]:
    """``limit`` indices of ``count`` drawn with a fixed seed, in order (all when limit <= 0).

    ImageFolder lists are sorted by class, so their first N would hold the first classes only.
    """
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted(np.random.default_rng(0).choice(count, size=limit, replace=False).tolist())


def _raw_pixels(image: Image.Image) -> FloatArray:
    """The image's own pixels, ``(H, W, 3)`` (the raw-pixel baseline; flattened per batch)."""
    return np.asarray(image, dtype=np.float32)


def _raw_pixels_at(recipe: PreprocessingRecipe) -> Callable[[Image.Image], FloatArray]:
    """Raw-pixel baseline after the recipe's resize and centre crop (no normalisation)."""

    def prepare(image: Image.Image) -> FloatArray:
        return _raw_pixels(resize_and_crop(image, recipe))

    return prepare


def _flatten(batch: FloatArray) -> FloatArray:
    return batch.reshape(len(batch), -1)  # (B, H, W, 3) -> (B, H*W*3)


def _names(name: str) -> list[str]:
    """``--a_b`` and ``--a-b``: both spellings, as ``training.pretrain`` accepts."""
    return [name, name.replace("_", "-")] if "_" in name else [name]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.eval_knn", description="Weighted k-NN evaluation (DINO protocol)."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        *_names("--checkpoint"),
        *_names("--pretrained_weights"),
        dest="checkpoint",
        type=Path,
        help="Training or backbone checkpoint.",
    )
    source.add_argument("--onnx", type=Path, help="Exported ONNX model (model.onnx).")
    source.add_argument(
        *_names("--raw_pixels"),
        dest="raw_pixels",
        action="store_true",
        help="Baseline: the images' own pixels as features (no resize; with --resolution R, "
        "resized and centre-cropped to R x R as the model's input would be).",
    )
    parser.add_argument(
        *_names("--checkpoint_key"),
        dest="checkpoint_key",
        default="teacher",
        help="teacher or student (default: teacher).",
    )
    parser.add_argument(
        *_names("--num_heads"),
        dest="num_heads",
        type=int,
        default=None,
        help="Attention heads of a backbone-only checkpoint whose width is not a standard one "
        "(default: from the checkpoint, else embed_dim / 64).",
    )
    parser.add_argument("--dataset", choices=["fashion-mnist"], help="Built-in dataset.")
    parser.add_argument(
        *_names("--train_dir"), dest="train_dir", type=Path, help="ImageFolder training split."
    )
    parser.add_argument(
        *_names("--val_dir"), dest="val_dir", type=Path, help="ImageFolder evaluation split."
    )
    parser.add_argument(
        *_names("--nb_knn"),
        dest="nb_knn",
        type=int,
        nargs="+",
        default=[10, 20, 100, 200],
        help="Numbers of neighbours k (default: 10 20 100 200).",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.07,
        help="Temperature T of the exp(similarity / T) vote weights (default: 0.07).",
    )
    parser.add_argument(
        *_names("--batch_size"),
        dest="batch_size",
        type=int,
        default=128,
        help="Images per forward pass (default: 128).",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Override the crop size (at least the patch size).",
    )
    parser.add_argument(
        *_names("--train_limit"),
        dest="train_limit",
        type=int,
        default=0,
        help="Use N train images (Fashion-MNIST: the first N; ImageFolder: a fixed seeded "
        "sample; default 0: all).",
    )
    parser.add_argument(
        *_names("--test_limit"),
        dest="test_limit",
        type=int,
        default=0,
        help="Use N test images (Fashion-MNIST: the first N; ImageFolder: a fixed seeded "
        "sample; default 0: all).",
    )
    parser.add_argument(
        "--output", type=Path, help="Also write the results here, as one JSON array."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; prints one JSON line per k. Returns the exit status (130 on
    Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    own_logging = not logging.root.handlers  # else a host program set logging up: leave it
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if bool(args.dataset) == bool(args.train_dir or args.val_dir):
        parser.error("give either --dataset fashion-mnist or --train_dir and --val_dir")
    if not args.dataset and not (args.train_dir and args.val_dir):
        parser.error("--train_dir and --val_dir go together")
    if any(k <= 0 for k in args.nb_knn) or args.batch_size <= 0:
        parser.error("--nb_knn and --batch_size must be positive")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        parser.error(f"--temperature must be a positive number, got {args.temperature}")
    if args.resolution is not None and not 0 < args.resolution <= MAX_RESOLUTION:
        parser.error(f"--resolution must be in [1, {MAX_RESOLUTION}], got {args.resolution}")
    if args.num_heads is not None and args.num_heads <= 0:
        parser.error(f"--num_heads must be positive, got {args.num_heads}")
    if args.train_limit < 0 or args.test_limit < 0:
        parser.error("--train_limit and --test_limit must be >= 0 (0: all images)")
    try:
        from models.checkpoint import CheckpointError
    except ImportError:  # pragma: no cover
        CheckpointError = RuntimeError  # type: ignore[misc,assignment]
    if args.output is not None:  # fail before the work, not after it
        overwritten = _overwritten_input(args.output, args)
        if overwritten is not None:
            parser.error(
                f"--output {args.output} would overwrite {overwritten}; write the results to "
                "another file"
            )
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"--output {args.output}: cannot create its folder ({err})")
        if args.output.is_dir():
            parser.error(f"--output {args.output} is a directory; give a file name")
        try:  # can it be written? (not after an hour of feature extraction)
            # stat follows links, /dev/stdout and /dev/fd/N (process substitution) included,
            # whose targets resolve() cannot name ("pipe:[123]"): those are written directly.
            if args.output.is_file():
                with open(args.output, "a"):  # opened for writing, nothing written
                    pass
            elif args.output.exists():  # a pipe or a device: not opened here, as closing a
                # named pipe would end its reader's input
                if not os.access(args.output, os.W_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            else:  # a link's target is what gets written
                target = Path(os.path.realpath(args.output))
                new_temp_file(target.parent, ".eval-knn-", ".tmp").unlink()
        except OSError as err:
            parser.error(f"--output {args.output}: cannot write there ({err.strerror or err})")
    try:
        prepare: Callable[[Image.Image], FloatArray] | None = None
        extract: Extractor
        if args.raw_pixels:
            recipe = PreprocessingRecipe.for_resolution(args.resolution or 224)
            prepare = _raw_pixels_at(recipe) if args.resolution else _raw_pixels
            extract = _flatten
            source = "the raw pixels"
        elif args.onnx is not None:
            extract, recipe = onnx_extractor(args.onnx, args.resolution)
            source = f"the ONNX model {args.onnx}"
        else:
            extract, recipe = torch_extractor(
                args.checkpoint, args.checkpoint_key, args.resolution, args.num_heads
            )
            source = f"the checkpoint {args.checkpoint}"
        if args.dataset:
            train_x, train_y = read_fashion_mnist("train")
            test_x, test_y = read_fashion_mnist("test")
            n_train, n_test = (
                _limit(len(train_x), args.train_limit),
                _limit(len(test_x), args.test_limit),
            )
            train_loaders = [_array_loader(train_x, i) for i in range(n_train)]
            test_loaders = [_array_loader(test_x, i) for i in range(n_test)]
            train_labels, test_labels = list(train_y[:n_train]), list(test_y[:n_test])
        else:
            train_paths, train_labels, classes = image_folder(args.train_dir)
            test_paths, test_labels, _ = image_folder(args.val_dir, classes)
            keep = _sample(len(train_paths), args.train_limit)
            train_paths, train_labels = (
                [train_paths[i] for i in keep],
                [train_labels[i] for i in keep],
            )
            keep = _sample(len(test_paths), args.test_limit)
            test_paths, test_labels = [test_paths[i] for i in keep], [test_labels[i] for i in keep]
            train_loaders = [_file_loader(p) for p in train_paths]
            test_loaders = [_file_loader(p) for p in test_paths]
        # Skip warnings above the progress bars, when the root logger is this CLI's own.
        redirect = logging_redirect_tqdm() if own_logging else contextlib.nullcontext()
        with redirect:
            train = extract_features(
                train_loaders, extract, recipe, args.batch_size, "train", prepare, source
            )
            test = extract_features(
                test_loaders, extract, recipe, args.batch_size, "test", prepare, source
            )
        if train.item_shape != test.item_shape:  # raw pixels of other sizes in the two splits
            raise DataError(_MIXED_SIZES)
        train_f, train_kept, test_f, test_kept = train.vectors, train.kept, test.vectors, test.kept
    except (DataError, CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    train_t = torch.tensor([int(train_labels[i]) for i in train_kept])
    test_t = torch.tensor([int(test_labels[i]) for i in test_kept])
    results = []
    for k in args.nb_knn:
        if k > len(train_t):
            logger.warning(
                "k=%d is more than the %d training images: all of them vote", k, len(train_t)
            )
        top1, top5 = knn_classifier(train_f, train_t, test_f, test_t, k, args.temperature)
        result = {
            "k": k,
            "k_used": min(k, len(train_t)),
            "top1": round(top1, 3),
            "top5": round(top5, 3),
            "n_train": len(train_t),
            "n_test": len(test_t),
            "temperature": args.temperature,
        }
        results.append(result)
        print(json.dumps(result))
    if args.output is not None:
        try:
            if _is_stdout(args.output):  # opening it anew would truncate the lines printed
                sys.stdout.write(json.dumps(results, indent=2) + "\n")
                sys.stdout.flush()
            else:
                args.output.write_text(json.dumps(results, indent=2) + "\n")
        except OSError as err:
            print(
                f"error: cannot write --output {args.output}: {err.strerror or err}",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
