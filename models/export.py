"""Export a DINO ViT to ONNX following :mod:`models.contract`.

``python -m models.export --weights PATH (--output FILE.onnx | --repository DIR --name NAME)``

The exported graph takes ``pixel_values [batch, 3, height, width]`` (dynamic batch, height and
width) and returns, in one pass, ``cls_embedding``, ``patch_features`` and ``attention_maps``.
Metadata (architecture, preprocessing recipe, weights hash, reference outputs on synthetic
images) is written into ``metadata_props``. A parity check against PyTorch runs before the file
is published; files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms

from models import contract, pretrained
from models.checkpoint import CheckpointError, LoadedBackbone, load_backbone
from models.files import (
    ABANDONED_AFTER_S,
    fsync_file,
    fsync_folder,
    new_temp_file,
    owner_tag,
    pid_alive,
    same_file,
)
from models.vit import VisionTransformer

PRECISIONS = ("float32", "float16")
FP32_MAX_ABS = {
    contract.CLS_EMBEDDING.name: 1e-4,
    contract.PATCH_FEATURES.name: 1e-4,
    contract.ATTENTION_MAPS.name: 1e-6,
}

logger = logging.getLogger(__name__)


class ExportError(Exception):
    """The export failed (parity, checker, or bad arguments)."""


class FeatureExtractor(nn.Module):
    """Wraps the ViT so that the traced graph follows the contract's input and outputs.

    With ``precision="float16"`` the weights are half precision while the graph's inputs and
    outputs stay float32 (casts at the boundary), so clients see the same contract.
    """

    def __init__(self, model: VisionTransformer, precision: str = "float32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ExportError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.model = model
        self.dtype = torch.float16 if precision == "float16" else torch.float32

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(cls_embedding, patch_features, attention_maps)`` in float32."""
        cls, patches, attn = self.model.forward_features(pixel_values.to(self.dtype))
        return cls.float(), patches.float(), attn.float()


@dataclass
class ExportReport:
    """What an export produced and measured."""

    path: Path
    size_bytes: int
    seconds: float
    precision: str
    parity: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable paragraph."""
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, {self.precision}) "
            f"in {self.seconds:.1f} s"
        ]
        for row in self.parity:
            lines.append("  parity " + json.dumps(row))
        return "\n".join(lines)


def reference_pixels(recipe: contract.PreprocessingRecipe, case: int) -> Tensor:
    """DINO's evaluation transform (torchvision on PIL) applied to a synthetic reference image.

    Returns:
        ``[1, 3, resolution, resolution]`` float32.
    """
    width, height, data = contract.reference_image_rgb(case)
    image = Image.frombytes("RGB", (width, height), data)
    transform = transforms.Compose(
        [
            transforms.Resize(
                recipe.resize_size, interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(recipe.resolution),
            transforms.ToTensor(),
            transforms.Normalize(recipe.mean, recipe.std),
        ]
    )
    pixels: Tensor = transform(image)
    return pixels.unsqueeze(0)  # (1, 3, res, res)


def _parity_sizes(resolution: int, patch_size: int) -> list[tuple[int, int]]:
    """The square default size and a non-square one (320x256 for 224 at patch 16)."""
    return [(resolution, resolution), (resolution + 6 * patch_size, resolution + 2 * patch_size)]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def check_parity(
    session: ort.InferenceSession,
    model: VisionTransformer,
    *,
    resolution: int,
    precision: str,
    batch_sizes: Sequence[int] = (1, 2),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Compare ONNX Runtime with PyTorch (fp32) on random inputs at two resolutions.

    Returns:
        One row per (height, width, batch) with the max abs error (and min cosine) per output.

    Raises:
        ExportError: fp32 errors above the contract's tolerances.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for height, width in _parity_sizes(resolution, model.patch_size):
        for batch in batch_sizes:
            x = torch.randn(batch, 3, height, width, generator=generator)
            with torch.no_grad():
                expected = [t.numpy() for t in model.forward_features(x)]
            got = session.run(list(contract.OUTPUT_NAMES), {contract.PIXEL_VALUES.name: x.numpy()})
            row: dict[str, Any] = {"height": height, "width": width, "batch": batch}
            for spec, exp, out in zip(contract.OUTPUTS, expected, got, strict=True):
                if out.shape != exp.shape:
                    raise ExportError(f"{spec.name}: ONNX shape {out.shape} != PyTorch {exp.shape}")
                for who, values in (("ONNX Runtime", out), ("PyTorch", exp)):
                    if not np.isfinite(values).all():  # NaN compares false with any tolerance
                        raise ExportError(
                            f"parity check failed: {spec.name} from {who} is not finite (NaN "
                            f"or inf) at {height}x{width}: NaN/inf weights"
                            + (
                                ", or values beyond float16's range"
                                if precision != "float32"
                                else ""
                            )
                        )
                row[f"{spec.name}_max_abs"] = float(np.abs(out - exp).max())
                row[f"{spec.name}_min_cosine"] = _cosine(out, exp)
            rows.append(row)
            if precision == "float32":
                by_name = dict(zip(contract.OUTPUT_NAMES, expected, strict=True))
                for name, limit in FP32_MAX_ABS.items():
                    # float32 rounding grows with the values' size: relative above magnitude 1
                    allowed = limit * max(1.0, float(np.abs(by_name[name]).max()))
                    if row[f"{name}_max_abs"] > allowed:
                        raise ExportError(
                            f"parity check failed: {name} differs from PyTorch by "
                            f"{row[f'{name}_max_abs']:.3g} > {allowed:.3g} at {height}x{width}, "
                            f"batch {batch}"
                        )
    return rows


def build_metadata(
    model: VisionTransformer,
    *,
    resolution: int,
    precision: str,
    weights_sha256: str,
    source: str,
) -> dict[str, str]:
    """Metadata for ``metadata_props``, with reference CLS outputs of the synthetic images."""
    config = model.config
    if resolution % config.patch_size:
        raise ExportError(f"resolution {resolution} is not a multiple of patch {config.patch_size}")
    if config.in_chans != 3:
        raise ExportError(
            f"the patch embedding takes {config.in_chans} input channels; the contract's input "
            "is an RGB image (3 channels)"
        )
    recipe = contract.PreprocessingRecipe.for_resolution(resolution)
    embeddings = []
    for case in range(len(contract.REFERENCE_CASES)):
        with torch.no_grad():
            cls = model(reference_pixels(recipe, case))
        if not torch.isfinite(cls).all():
            raise ExportError(
                f"the model's CLS output for reference image {case} is not finite (NaN or inf "
                "weights?)"
            )
        embeddings.append([float(v) for v in cls[0].tolist()])
    key = contract.MetadataKey
    return {
        key.CONTRACT_VERSION: contract.CONTRACT_VERSION,
        key.ARCH: config.arch,
        key.PATCH_SIZE: str(config.patch_size),
        key.EMBED_DIM: str(config.embed_dim),
        key.DEPTH: str(config.depth),
        key.NUM_HEADS: str(config.num_heads),
        key.RESOLUTION: str(resolution),
        key.IMAGE_MEAN: json.dumps(list(recipe.mean)),
        key.IMAGE_STD: json.dumps(list(recipe.std)),
        key.PREPROCESSING: recipe.to_json(),
        key.WEIGHTS_SHA256: weights_sha256,
        key.REFERENCE: contract.reference_metadata(
            resolution=resolution, cls_embeddings=embeddings, precision=precision
        ),
        key.PRECISION: precision,
        key.SOURCE: source,
    }


def _trace(model: VisionTransformer, path: Path, *, resolution: int, precision: str) -> None:
    wrapper = FeatureExtractor(model, precision).eval()
    if precision == "float16":
        wrapper = wrapper.half()
    example = torch.zeros(1, 3, resolution, resolution)
    dynamic_axes = {**contract.DYNAMIC_INPUT_AXES, **contract.DYNAMIC_OUTPUT_AXES}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of torch.export, but it is the
        # one that keeps height and width symbolic through the pos-embed resampling here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[contract.PIXEL_VALUES.name],
            output_names=list(contract.OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=contract.ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _declare_static_axes(proto: onnx.ModelProto, model: VisionTransformer) -> None:
    """Write the sizes that follow from the model into the graph's output shapes.

    The TorchScript exporter leaves some of them symbolic (``Castcls_embedding_dim_1``); the
    contract fixes them (``embed_dim``, ``num_heads``), and the contract's own names go on the
    dynamic axes, so the file's signature reads as the contract does.
    """
    sizes = {"embed_dim": model.config.embed_dim, "num_heads": model.config.num_heads}
    specs = {spec.name: spec for spec in (*contract.INPUTS, *contract.OUTPUTS)}
    for value in (*proto.graph.input, *proto.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != spec.rank:
            raise ExportError(f"{value.name} has rank {len(dims)}, the contract says {spec.rank}")
        for index, axis in enumerate(spec.axes):
            dim = dims[index]
            if isinstance(axis, int):
                dim.dim_value = axis
            elif axis in sizes:
                dim.dim_value = sizes[axis]
            else:  # batch, height, width, num_patches
                dim.dim_param = axis


def export_model(
    model: VisionTransformer,
    path: Path,
    *,
    resolution: int,
    precision: str = "float32",
    weights_sha256: str,
    source: str,
    log: bool = False,
) -> ExportReport:
    """Export ``model`` to ``path`` (atomically), after checking it against PyTorch.

    Args:
        model: The backbone; it is left as it was (a model that is not all fp32 is exported
            from an fp32 copy; its train/eval mode is restored).
        path: Destination ``.onnx`` file; replaced only when the export succeeded. A symbolic
            link is written through: its target is replaced (atomically) and the link kept.
        resolution: Default input size (recorded in the metadata and the recipe).
        precision: ``float32``, or ``float16`` weights (drift is reported, not enforced).
        weights_sha256: Digest of the source weights, for the metadata.
        source: Where the weights came from, for the metadata.
        log: Print progress to stderr.

    Raises:
        ExportError: Parity failure, checker failure or bad arguments.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        model = copy.deepcopy(model).float()  # the caller's model keeps its precision
    was_training = model.training
    model.eval()
    try:
        return _export_eval_model(
            model,
            path,
            resolution=resolution,
            precision=precision,
            weights_sha256=weights_sha256,
            source=source,
            log=log,
        )
    finally:
        model.train(was_training)


def _export_eval_model(
    model: VisionTransformer,
    path: Path,
    *,
    resolution: int,
    precision: str,
    weights_sha256: str,
    source: str,
    log: bool,
) -> ExportReport:
    """:func:`export_model` of an fp32 model in eval mode."""
    start = time.perf_counter()
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give the path of the .onnx file to write")
    # A link is written through, as eval_knn's --output and a shell's > are: replacing the
    # link itself would leave what it points to (what the user meant) unchanged.
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ExportError(
            f"cannot create the folder of {path}: {err.strerror}: {err.filename} "
            "(a file is in the way)"
        ) from err

    def say(message: str) -> None:
        if log:
            print(f"[export {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr)

    metadata = build_metadata(
        model,
        resolution=resolution,
        precision=precision,
        weights_sha256=weights_sha256,
        source=source,
    )
    # mode 0666 less the umask: readable by the service's user (0644 by default)
    # Named after this host and process, so that a later export can tell a temporary file
    # a killed export left (see remove_abandoned_versions) from one being written.
    tmp = new_temp_file(target.parent, f".export.{owner_tag()}.{os.getpid()}.", ".onnx.tmp")
    try:
        say(f"tracing ({precision}, resolution {resolution})")
        if precision == "float16":
            half = VisionTransformer(model.config)
            half.load_state_dict(model.state_dict())
            _trace(half.eval(), tmp, resolution=resolution, precision=precision)
        else:
            _trace(model, tmp, resolution=resolution, precision=precision)
        proto = onnx.load(str(tmp))
        _declare_static_axes(proto, model)
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid graph"
            raise ExportError(f"the ONNX checker refused the exported graph: {first}") from err
        onnx.save(proto, str(tmp))
        say("parity check against PyTorch")
        parity = check_parity(_session(tmp), model, resolution=resolution, precision=precision)
        fsync_file(tmp)  # on disk before the rename makes it visible to a watching service
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException:  # also Ctrl-C: never leave a temp file behind
        tmp.unlink(missing_ok=True)
        raise
    report = ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - start,
        precision=precision,
        parity=parity,
        metadata=metadata,
    )
    say(report.summary())
    return report


def check_repository_target(repository: Path, name: str) -> Path:
    """Create ``repository/name`` when missing and check that versions can be written there,
    so that a long job that exports at its end learns of a bad target before it starts.

    Raises:
        ExportError: The name is invalid, or the folder cannot be created or written.
    """
    try:
        root = Path(repository) / contract.validate_model_name(name)
    except ValueError as err:
        raise ExportError(str(err)) from err
    try:
        root.mkdir(parents=True, exist_ok=True)
        new_temp_file(root, ".write-check-", ".tmp").unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f" ({err.filename})" if err.filename else ""
        raise ExportError(f"cannot write model versions into {root}: {reason}{where}") from err
    return root


_EXPORT_TEMP = re.compile(r"\.export\.(?P<owner>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.onnx\.tmp")
_OLD_EXPORT_TEMP = re.compile(r"\.export-[0-9a-f]+\.onnx\.tmp")  # before the owner was named


def _abandoned(entry: os.DirEntry[str], owner: str, now: float) -> bool:
    """Whether ``entry`` is an export's temporary file whose writer is gone: its process, if it
    ran on this host, is dead; else (another host's, or unnamed) it is unwritten for an hour."""
    match = _EXPORT_TEMP.fullmatch(entry.name)
    if match is None and _OLD_EXPORT_TEMP.fullmatch(entry.name) is None:
        return False
    if match is not None and match["owner"] == owner:
        return not pid_alive(int(match["pid"]))
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime >= ABANDONED_AFTER_S
    except OSError:
        return False


def remove_abandoned_versions(root: Path) -> list[str]:
    """Remove the version folders of ``root`` that exports killed before their rename left
    (SIGKILL, a power cut): no ``model.onnx``, only temporary files whose writer is gone (see
    :func:`_abandoned`), or empty for an hour. Returns the names of the folders removed.

    Without this, every killed export leaves a model-sized temporary file that nothing reads,
    in a folder that no later export reuses.
    """
    owner, now = owner_tag(), time.time()
    removed: list[str] = []
    try:
        with os.scandir(root) as listing:
            children = [c for c in listing if c.name.isascii() and c.name.isdigit()]
    except OSError:
        return removed
    for child in children:
        folder = Path(child.path)
        try:
            if not child.is_dir(follow_symlinks=False):
                continue
            with os.scandir(folder) as listing:
                entries = list(listing)
            if any(entry.name == contract.MODEL_FILENAME for entry in entries):
                continue  # a version (or one being published)
            if entries:
                if not all(_abandoned(entry, owner, now) for entry in entries):
                    continue
            elif now - child.stat(follow_symlinks=False).st_mtime < ABANDONED_AFTER_S:
                continue  # an export may have just created it
            for entry in entries:
                os.unlink(entry.path)
            folder.rmdir()
        except OSError:  # another process got there first, or no permission: left as it is
            continue
        removed.append(child.name)
    return removed


def next_version_dir(
    repository: Path, name: str, report: Callable[[str], None] = logger.info
) -> Path:
    """Create and return ``repository/name/<max existing + 1>`` (race-free with ``mkdir``),
    after removing the folders that killed exports left (:func:`remove_abandoned_versions`;
    ``report`` says which)."""
    root = Path(repository) / contract.validate_model_name(name)
    root.mkdir(parents=True, exist_ok=True)
    abandoned = remove_abandoned_versions(root)
    if abandoned:
        folders = ", ".join(sorted(abandoned, key=int))
        report(f"removed the version folder(s) {folders} that interrupted exports left in {root}")
    numbers = [int(p.name) for p in root.iterdir() if p.name.isascii() and p.name.isdigit()]
    # "02" counts as 2 (never reuse a number someone meant), numbers the service ignores do not.
    version = max((n for n in numbers if n <= contract.MAX_VERSION), default=0) + 1
    while True:
        if version > contract.MAX_VERSION:
            raise ExportError(f"{root} has no free version number up to {contract.MAX_VERSION}")
        candidate = root / str(version)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            version += 1


def export_to_repository(
    model: VisionTransformer,
    repository: Path,
    name: str,
    *,
    resolution: int,
    precision: str = "float32",
    weights_sha256: str,
    source: str,
    log: bool = False,
) -> ExportReport:
    """Export into ``repository/name/<next version>/model.onnx`` (Triton's layout).

    The version directory is created first; the model file appears in it by an atomic rename
    once it is complete and checked, so a watching service never reads half a file.
    """
    if log:
        version_dir = next_version_dir(
            repository, name, lambda message: print(f"[export] {message}", file=sys.stderr)
        )
    else:
        version_dir = next_version_dir(repository, name)
    try:
        return export_model(
            model,
            version_dir / contract.MODEL_FILENAME,
            resolution=resolution,
            precision=precision,
            weights_sha256=weights_sha256,
            source=source,
            log=log,
        )
    except BaseException:
        if not any(version_dir.iterdir()):
            version_dir.rmdir()
        raise


# ModelProto's metadata_props, and the key and value of a StringStringEntryProto (onnx.proto).
_METADATA_PROPS_FIELD, _KEY_FIELD, _VALUE_FIELD = 14, 1, 2


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without parsing its graph.

    The file's top-level protobuf fields are walked and the graph (the weights) is skipped by
    seeking: ``onnx.load`` parsed all of it, about 0.5 s and 1.3 GiB of memory for a ViT-B.

    Raises:
        OSError: The file cannot be read.
        ValueError: It is not a protobuf message (cut short, or another kind of file).
    """
    props: dict[str, str] = {}
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        while handle.tell() < size:
            field, wire = _read_tag(handle)
            if wire == 2:  # length-delimited: a string, bytes or a message
                length = _read_varint(handle)
                if handle.tell() + length > size:
                    raise ValueError(f"{path}: field {field} runs past the end of the file")
                if field == _METADATA_PROPS_FIELD:
                    key, value = _string_entry(handle.read(length), path)
                    props[key] = value
                else:
                    handle.seek(length, os.SEEK_CUR)
            elif wire == 0:
                _read_varint(handle)
            elif wire in (1, 5):  # fixed 64 and 32 bits
                handle.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                raise ValueError(f"{path} is not an ONNX model (protobuf wire type {wire})")
    return props


def _read_varint(handle: IO[bytes]) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = handle.read(1)
        if not byte:
            raise ValueError("a protobuf varint runs past the end of the file")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ValueError("a protobuf varint is longer than 10 bytes")


def _read_tag(handle: IO[bytes]) -> tuple[int, int]:
    tag = _read_varint(handle)
    return tag >> 3, tag & 7


def _string_entry(data: bytes, path: Path) -> tuple[str, str]:
    """The key and value of one serialised StringStringEntryProto."""
    stream = io.BytesIO(data)
    found = {_KEY_FIELD: "", _VALUE_FIELD: ""}
    while stream.tell() < len(data):
        field, wire = _read_tag(stream)
        if wire != 2:
            raise ValueError(f"{path}: a metadata entry holds a field of wire type {wire}")
        length = _read_varint(stream)
        text = stream.read(length)
        if len(text) != length:
            raise ValueError(f"{path}: a metadata entry is cut short")
        if field in found:
            found[field] = text.decode("utf-8")
    return found[_KEY_FIELD], found[_VALUE_FIELD]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.export",
        description="Export a DINO ViT checkpoint to ONNX (CLS, patch features, attention maps).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="checkpoint (.pth): official or ours")
    source.add_argument(
        "--pretrained",
        choices=sorted(pretrained.PRETRAINED),
        help="download an official DINO backbone (needs network)",
    )
    parser.add_argument(
        "--checkpoint-key",
        "--checkpoint_key",
        default="teacher",
        help="network of a full checkpoint",
    )
    parser.add_argument("--arch", default="auto", help="auto, vit_tiny, vit_small or vit_base")
    parser.add_argument(
        "--patch-size", "--patch_size", type=int, default=None, help="check the patch size"
    )
    parser.add_argument(
        "--num-heads",
        "--num_heads",
        type=int,
        default=None,
        help="default: from the checkpoint's config or --arch, else embed_dim / 64",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", type=Path, help="write this .onnx file")
    out.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository (default: $DINO_MODEL_REPOSITORY or model_repository)",
    )
    parser.add_argument(
        "--name", default=None, help="model name in the repository (default dino_default)"
    )
    parser.add_argument("--fp16", action="store_true", help="half-precision weights")
    parser.add_argument("--resolution", type=int, default=None, help="default: training size")
    parser.add_argument(
        "--trust-checkpoint",
        "--trust_checkpoint",
        action="store_true",
        help="allow arbitrary pickled objects in the file (only for files you trust)",
    )
    parser.add_argument(
        "--cache-dir",
        "--cache_dir",
        type=Path,
        default=None,
        help="download cache for --pretrained (default: $DINO_CACHE_DIR, else "
        "$XDG_CACHE_HOME/dino-features, else ~/.cache/dino-features)",
    )
    return parser


def _load_pretrained(
    name: str, cache_dir: Path | None, output: Path | None = None
) -> LoadedBackbone:
    """Fetch (or reuse) the checked download of ``name`` and load it.

    The source recorded for the metadata names the URL the file was really downloaded from:
    ``official`` only for the release server, else the mirror, else that it is not recorded.
    An ``output`` that is the cached download itself is refused (the export would replace it).
    """
    path = pretrained.fetch_pretrained(name, cache_dir=cache_dir or pretrained.default_cache_dir())
    if output is not None and same_file(output, path):
        raise pretrained.PretrainedError(
            f"--output {output} is the download cache's copy of {name} ({path}): the export "
            "would replace it; write the model to another file"
        )
    spec = pretrained.PRETRAINED[name]
    try:
        loaded = load_backbone(path, arch=spec.arch, patch_size=spec.patch_size)
    except CheckpointError as err:
        raise pretrained.PretrainedError(
            f"{err}. {path} is the download cache's copy of {name}: delete it and run the "
            "command again to download it anew"
        ) from None
    pretrained.verify_structure(loaded.model.state_dict(), spec)
    loaded.source = pretrained.describe_source(spec, path, loaded.sha256)
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.output and args.name is not None:
        parser.error("--name applies to --repository, not to --output")
    if args.output and args.weights and same_file(args.output, args.weights):
        parser.error(
            f"--output {args.output} is the --weights file {args.weights}: the export would "
            "replace it; write the model to another file"
        )
    if args.name is not None:
        try:  # an empty --name "$UNSET" must not publish over dino_default
            contract.validate_model_name(args.name)
        except ValueError as err:
            parser.error(f"--name: {err}")
    if args.resolution is not None and args.resolution <= 0:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    fixed = (args.arch != "auto", args.num_heads is not None, args.patch_size is not None)
    if args.pretrained and any(fixed):
        parser.error("--pretrained fixes the architecture: drop --arch/--patch-size/--num-heads")
    repository = args.repository or Path(
        os.environ.get("DINO_MODEL_REPOSITORY", "model_repository")
    )
    name = args.name if args.name is not None else "dino_default"
    before = _published(args.output, repository, name)
    with _sigterm_interrupts():
        try:
            return _export(args, repository, name)
        except _Interrupted as stop:
            after = _published(args.output, repository, name)
            new = sorted(label for label, state in after.items() if before.get(label) != state)
            # A signal after the rename (during the final fsync or the report) comes too late
            # to undo the publication: say what is there, so that nobody exports it again.
            outcome = f"{', '.join(new)} was published" if new else "nothing was published"
            print(f"error: interrupted ({stop.signal_name}); {outcome}", file=sys.stderr)
            return stop.status


def _published(output: Path | None, repository: Path, name: str) -> dict[str, tuple[int, int]]:
    """What an export would have published, as it is now: the ``--output`` file, or the
    model's versions in the repository, each with its file's (inode, mtime)."""
    try:
        if output is not None:
            state = output.stat()
            return {str(output): (state.st_ino, state.st_mtime_ns)}
        found: dict[str, tuple[int, int]] = {}
        for version in contract.model_versions(repository, name):
            state = contract.model_path(repository, name, version).stat()
            found[f"version {version} of {repository / name}"] = (state.st_ino, state.st_mtime_ns)
        return found
    except (OSError, ValueError):
        return {}


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM: unwinds like KeyboardInterrupt, so temporary files are removed."""

    def __init__(self, signal_name: str, status: int) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.status = status


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``docker stop``, a scheduler) and Ctrl-C raise :class:`_Interrupted`."""

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        raise _Interrupted(name, 128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _export(args: argparse.Namespace, repository: Path, name: str) -> int:
    """Load, export and report; returns the exit status."""
    try:
        if args.pretrained:
            loaded = _load_pretrained(args.pretrained, args.cache_dir, args.output)
        else:
            loaded = load_backbone(
                args.weights,
                checkpoint_key=args.checkpoint_key,
                arch=args.arch,
                patch_size=args.patch_size,
                num_heads=args.num_heads,
                trust=args.trust_checkpoint,
            )
        resolution = args.resolution or loaded.config.img_size
        precision = "float16" if args.fp16 else "float32"
        common: dict[str, Any] = {
            "resolution": resolution,
            "precision": precision,
            "weights_sha256": loaded.sha256,
            "source": loaded.source,
            "log": True,
        }
        if args.output:
            report = export_model(loaded.model, args.output, **common)
        else:
            check_repository_target(repository, name)
            report = export_to_repository(loaded.model, repository, name, **common)
    except (CheckpointError, ExportError, pretrained.PretrainedError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:  # the engine: out of memory, a bad graph
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: the export failed: {first[:500]}", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in loaded.model.parameters())
    print(
        json.dumps(
            {
                "path": str(report.path),
                "arch": loaded.config.arch,
                "parameters": params,
                "size_bytes": report.size_bytes,
                "seconds": round(report.seconds, 2),
                "precision": precision,
                "parity": report.parity,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
