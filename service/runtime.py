"""One ONNX model on onnxruntime: provider choice, contract check, self-check and warm-up.

A model only serves after :func:`load_model` has (1) bound the intended execution provider,
(2) checked the graph's inputs/outputs against :mod:`models.contract` (names, ranks, sizes and
which axes are dynamic), (3) parsed its metadata, (4) re-computed the reference images' CLS
embeddings through this service's own decode and preprocessing path and compared them with the
outputs recorded at export, (5) run a non-square input of another size and checked every
output's shape, and (6) run warm-up batches (their output shapes checked too).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from models import contract
from service.attention import attention_bytes
from service.preprocess import INTERPOLATIONS, plan_geometry, to_pixels

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
MAX_MODEL_FILE_BYTES = 2**31
"""Largest model file: protobuf's limit (larger exports keep their weights in external files,
which the service does not load)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")


class ModelLoadError(Exception):
    """The model file cannot be served (unreadable, contract mismatch, self-check failure)."""


class DeviceUnavailableError(ModelLoadError):
    """``DINO_DEVICE=cuda`` but the CUDA provider is not available or not bound."""


@dataclass(frozen=True)
class ModelMetadata:
    """The parsed ``metadata_props`` of an exported model."""

    contract_version: str
    arch: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    resolution: int
    recipe: contract.PreprocessingRecipe
    weights_sha256: str
    precision: str
    source: str
    reference: dict[str, Any]


@dataclass(frozen=True)
class SelfCheck:
    """Outcome of the load-time reference comparison."""

    cases: int
    max_abs_error: float
    min_cosine: float
    tolerance_abs: float
    tolerance_cosine: float


def parse_metadata(props: dict[str, str]) -> ModelMetadata:
    """Validate and parse the contract's metadata keys.

    Raises:
        ModelLoadError: A key is missing or malformed, or the contract version differs.
    """
    key = contract.MetadataKey
    missing = [name for name in key.REQUIRED if name not in props]
    if missing:
        raise ModelLoadError(f"metadata lacks {', '.join(missing)}")
    if props[key.CONTRACT_VERSION] != contract.CONTRACT_VERSION:
        raise ModelLoadError(
            f"contract version {props[key.CONTRACT_VERSION]!r} is not the supported "
            f"{contract.CONTRACT_VERSION!r}"
        )
    try:
        patch_size = int(props[key.PATCH_SIZE])
        embed_dim = int(props[key.EMBED_DIM])
        depth = int(props[key.DEPTH])
        num_heads = int(props[key.NUM_HEADS])
        resolution = int(props[key.RESOLUTION])
        recipe = contract.PreprocessingRecipe.from_json(props[key.PREPROCESSING])
        reference = contract.parse_reference_metadata(props[key.REFERENCE])
    except ValueError as err:
        raise ModelLoadError(f"malformed metadata: {err}") from err
    if min(patch_size, embed_dim, depth, num_heads, resolution) < 1:
        raise ModelLoadError("metadata sizes must be positive")
    if resolution % patch_size or recipe.resolution != resolution:
        raise ModelLoadError(
            f"resolution {resolution} / recipe {recipe.resolution} / patch {patch_size} disagree"
        )
    if recipe.interpolation not in INTERPOLATIONS:
        raise ModelLoadError(f"unknown interpolation {recipe.interpolation!r} in the recipe")
    if reference.get("crop", "center") != "center" or not reference["cases"]:
        raise ModelLoadError("reference outputs must be centre-crop cases")
    if len(reference["cases"]) > len(contract.REFERENCE_CASES):
        raise ModelLoadError(
            f"{len(reference['cases'])} reference cases; the contract has "
            f"{len(contract.REFERENCE_CASES)}"
        )
    if _SHA256.fullmatch(props[key.WEIGHTS_SHA256]) is None:
        raise ModelLoadError(
            f"{key.WEIGHTS_SHA256} {props[key.WEIGHTS_SHA256][:80]!r} is not a SHA-256 digest "
            "(64 lower-case hex digits)"
        )
    if props[key.PRECISION] not in contract.REFERENCE_MIN_COSINE:
        raise ModelLoadError(
            f"unknown precision {props[key.PRECISION][:40]!r}; one of "
            f"{', '.join(contract.REFERENCE_MIN_COSINE)}"
        )
    return ModelMetadata(
        contract_version=props[key.CONTRACT_VERSION],
        arch=props[key.ARCH],
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        resolution=resolution,
        recipe=recipe,
        weights_sha256=props[key.WEIGHTS_SHA256],
        precision=props[key.PRECISION],
        source=props.get(key.SOURCE, ""),
        reference=reference,
    )


def check_contract(session: ort.InferenceSession, metadata: ModelMetadata) -> None:
    """Compare the graph's inputs and outputs with :mod:`models.contract`.

    Raises:
        ModelLoadError: Names, ranks or static sizes differ.
    """
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [spec.name for spec in contract.INPUTS]:
        raise ModelLoadError(
            f"inputs {[i.name for i in inputs]} differ from the contract's "
            f"{[spec.name for spec in contract.INPUTS]}"
        )
    shape = inputs[0].shape
    if len(shape) != contract.PIXEL_VALUES.rank or (isinstance(shape[1], int) and shape[1] != 3):
        raise ModelLoadError(f"input shape {shape} is not [batch, 3, height, width]")
    for axis, axis_name in contract.DYNAMIC_INPUT_AXES[contract.PIXEL_VALUES.name].items():
        if isinstance(shape[axis], int):
            raise ModelLoadError(
                f"input {contract.PIXEL_VALUES.name!r} has a fixed {axis_name} of {shape[axis]}; "
                "the contract needs it dynamic (export with models.export)"
            )
    outputs = {o.name: o for o in session.get_outputs()}
    expected = {
        contract.CLS_EMBEDDING.name: (contract.CLS_EMBEDDING.rank, metadata.embed_dim),
        contract.PATCH_FEATURES.name: (contract.PATCH_FEATURES.rank, metadata.embed_dim),
        contract.ATTENTION_MAPS.name: (contract.ATTENTION_MAPS.rank, None),
    }
    for name, (rank, last_dim) in expected.items():
        if name not in outputs:
            raise ModelLoadError(f"output {name!r} is missing (outputs: {sorted(outputs)})")
        shape = outputs[name].shape
        if len(shape) != rank:
            raise ModelLoadError(f"output {name!r} has rank {len(shape)}, contract says {rank}")
        if last_dim is not None and isinstance(shape[-1], int) and shape[-1] != last_dim:
            raise ModelLoadError(f"output {name!r} has width {shape[-1]}, metadata {last_dim}")
        if outputs[name].type not in _FLOAT_TYPES:
            raise ModelLoadError(f"output {name!r} is a {outputs[name].type}, not floats")
    if inputs[0].type not in _FLOAT_TYPES:
        raise ModelLoadError(f"input {inputs[0].name!r} is a {inputs[0].type}, not floats")
    heads = outputs[contract.ATTENTION_MAPS.name].shape[1]
    if isinstance(heads, int) and heads != metadata.num_heads:
        raise ModelLoadError(f"attention has {heads} heads, metadata says {metadata.num_heads}")
    for name, axes in contract.DYNAMIC_OUTPUT_AXES.items():
        for axis, axis_name in axes.items():
            size = outputs[name].shape[axis]
            if isinstance(size, int):
                raise ModelLoadError(
                    f"output {name!r} has a fixed {axis_name} of {size}; the contract needs it "
                    "dynamic (export with models.export)"
                )


def check_output_shapes(
    values: dict[str, np.ndarray], metadata: ModelMetadata, *, batch: int, height: int, width: int
) -> None:
    """Check a run's outputs against the shapes the contract gives for its input.

    Raises:
        ModelLoadError: An output's shape differs (``[B, D]``, ``[B, N, D]``, ``[B, heads, N]``
            with ``N = (height / patch) * (width / patch)``).
    """
    patches = (height // metadata.patch_size) * (width // metadata.patch_size)
    expected = {
        contract.CLS_EMBEDDING.name: (batch, metadata.embed_dim),
        contract.PATCH_FEATURES.name: (batch, patches, metadata.embed_dim),
        contract.ATTENTION_MAPS.name: (batch, metadata.num_heads, patches),
    }
    for name, value in values.items():
        if tuple(value.shape) != expected[name]:
            raise ModelLoadError(
                f"output {name!r} has shape {list(value.shape)} for a {batch}x3x{height}x{width} "
                f"input; the contract says {list(expected[name])}"
            )


def gpu_present() -> bool:
    """Whether an NVIDIA device node exists (cheap test before asking for CUDA)."""
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def cuda_unavailable_reason() -> str | None:
    """Why ``DINO_DEVICE=cuda`` cannot work here, found without loading a model (None: try)."""
    available = ort.get_available_providers()
    if CUDA not in available:
        return (
            f"DINO_DEVICE=cuda but this onnxruntime offers only {available} "
            "(install onnxruntime-gpu)"
        )
    if not gpu_present():
        return (
            "DINO_DEVICE=cuda but no NVIDIA GPU is visible (no /dev/nvidia* device; in a "
            "container, start it with the GPU: docker run --gpus all, or compose's "
            "deploy.resources.reservations.devices)"
        )
    return None


def requested_providers(device: str) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers to request for ``device`` (``auto``, ``cuda`` or ``cpu``).

    ``auto`` asks for CUDA only when the CUDA provider is compiled in and a GPU device node
    exists, so a CPU-only machine never tries (and never logs) a failing CUDA load.

    Raises:
        DeviceUnavailableError: ``cuda`` was asked for but this onnxruntime has no CUDA provider.
    """
    available = ort.get_available_providers()
    cuda = (
        CUDA,
        {
            "device_id": 0,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": True,
        },
    )
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise DeviceUnavailableError(
                f"DINO_DEVICE=cuda but this onnxruntime offers only {available} "
                "(install onnxruntime-gpu)"
            )
        return [cuda, CPU]
    if CUDA in available and gpu_present():
        return [cuda, CPU]
    return [CPU]


@functools.lru_cache(maxsize=8)
def _reference_image(case: int) -> Image.Image:
    width, height, data = contract.reference_image_rgb(case)
    return Image.frombytes("RGB", (width, height), data)


class RunControl:
    """Stops one inference call early, from another thread.

    onnxruntime checks the flag between operators, so a batch whose every request has gone
    stops within one operator instead of holding the inference thread to the end.
    """

    def __init__(self) -> None:
        self.options = ort.RunOptions()

    def terminate(self) -> None:
        """Ask the running call to stop; it then raises instead of returning."""
        self.options.terminate = True

    @property
    def terminated(self) -> bool:
        """Whether :meth:`terminate` was called."""
        return bool(self.options.terminate)


class OnnxModel:
    """A loaded, checked model.

    Args:
        session: The onnxruntime session.
        metadata: Parsed metadata.
        name: Model name in the repository.
        version: Version number.
        path: File it was read from.
        file_sha256: Digest of the ONNX file.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        *,
        name: str,
        version: int,
        path: Path,
        file_sha256: str,
    ) -> None:
        self.session = session
        self.metadata = metadata
        self.name = name
        self.version = version
        self.path = path
        self.file_sha256 = file_sha256
        self.provider: str = session.get_providers()[0]
        self.self_check: SelfCheck | None = None
        self._load_control: RunControl | None = None
        self._max_attention_bytes: int | None = None
        input_type = session.get_inputs()[0].type
        self._input_dtype = np.float16 if input_type == "tensor(float16)" else np.float32

    def run(
        self, pixels: np.ndarray, outputs: tuple[str, ...], control: RunControl | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            pixels: ``[B, 3, H, W]`` float32.
            outputs: Contract output names wanted.
            control: Lets another thread stop the call (it then raises).

        Returns:
            Output name -> float32 array (``[B, D]``, ``[B, N, D]``, ``[B, heads, N]``).
        """
        feed = {contract.PIXEL_VALUES.name: pixels.astype(self._input_dtype, copy=False)}
        options = None if control is None else control.options
        values = self.session.run(list(outputs), feed, options)
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(outputs, values, strict=True)
        }

    def check_reference(self) -> SelfCheck:
        """Compare CLS outputs on the reference images with the exported ones.

        Raises:
            ModelLoadError: An embedding is off by more than the recorded tolerances.
        """
        reference = self.metadata.reference
        resolution = int(reference["resolution"])
        if resolution % self.metadata.patch_size:
            raise ModelLoadError(f"reference resolution {resolution} is not a patch multiple")
        batch, expected = [], []
        for case in reference["cases"]:
            index = int(case["case"])
            if not 0 <= index < len(contract.REFERENCE_CASES):
                raise ModelLoadError(f"unknown reference case {index}")
            image = _reference_image(index)
            geometry = plan_geometry(
                image.width,
                image.height,
                recipe=self.metadata.recipe,
                resolution=resolution,
                crop="center",
                patch_size=self.metadata.patch_size,
                max_side=resolution,
            )
            batch.append(to_pixels(image, geometry, self.metadata.recipe))
            expected.append(np.asarray(case[contract.CLS_EMBEDDING.name], dtype=np.float64))
        pixels = np.stack(batch)
        self._within_budget(pixels.shape, "the reference images")
        outputs = self.run(pixels, (contract.CLS_EMBEDDING.name,), self._load_control)
        got = outputs[contract.CLS_EMBEDDING.name]
        if not np.isfinite(got).all():  # max()/min() below would skip NaN without a word
            raise ModelLoadError(
                "self-check failed: the model's CLS embeddings of the reference images are not "
                "finite (NaN or inf: broken weights, or values beyond float16's range)"
            )
        # The file's tolerances, never looser than the contract's for its precision (a file
        # must not be able to switch its own self-check off).
        precision = self.metadata.precision
        largest = max([1.0, *(float(np.abs(want).max()) for want in expected)])
        tol_abs = min(
            float(reference["max_abs_error"]), contract.REFERENCE_MAX_ABS_ERROR[precision] * largest
        )
        tol_cos = max(float(reference["min_cosine"]), contract.REFERENCE_MIN_COSINE[precision])
        worst_abs, worst_cos = 0.0, 1.0
        for row, want in zip(got.astype(np.float64), expected, strict=True):
            if row.shape != want.shape:
                raise ModelLoadError(f"reference width {want.shape} vs output {row.shape}")
            worst_abs = max(worst_abs, float(np.max(np.abs(row - want))))
            denom = float(np.linalg.norm(row) * np.linalg.norm(want)) or 1.0
            worst_cos = min(worst_cos, float(row @ want) / denom)
        result = SelfCheck(len(batch), worst_abs, worst_cos, tol_abs, tol_cos)
        if not (worst_abs <= tol_abs and worst_cos >= tol_cos):
            raise ModelLoadError(
                f"self-check failed: reference CLS max abs error {worst_abs:.3g} "
                f"(allowed {tol_abs:.3g}), min cosine {worst_cos:.6f} (required {tol_cos})"
            )
        return result

    def check_other_sizes(self) -> None:
        """Run one non-square image of another size and check every output's shape.

        Requests may ask for any patch-multiple size (``resolution``, ``crop=none``); a graph
        exported with a fixed size, or whose outputs do not follow the patch grid, is refused
        here rather than failing those requests later.

        Raises:
            ModelLoadError: The run fails or an output has the wrong shape.
        """
        patch = self.metadata.patch_size
        # An odd number of rows and of columns, unequal: an odd patch count and a non-square
        # grid, which the square warm-up at the default resolution does not exercise.
        rows = max(3, (self.metadata.resolution // 2) // patch) | 1
        height, width = rows * patch, (rows + 2) * patch
        self._within_budget((1, 3, height, width), "the other-size check")
        try:
            values = self.run(
                np.zeros((1, 3, height, width), np.float32),
                contract.OUTPUT_NAMES,
                self._load_control,
            )
        except Exception as err:
            if self._load_control is not None and self._load_control.terminated:
                raise
            raise ModelLoadError(
                f"the model fails on a {height}x{width} input (other sizes than "
                f"{self.metadata.resolution} must work): {err}"
            ) from err
        check_output_shapes(values, self.metadata, batch=1, height=height, width=width)
        _check_finite(values, f"a {height}x{width} input")

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run zero batches at the default resolution so the first request is not slow.

        A batch size whose attention would exceed the budget is warmed up at the largest batch
        that fits (the batcher splits such batches the same way).

        Raises:
            ModelLoadError: One image at the default resolution exceeds the attention budget,
                or an output's shape differs from the contract's or is not finite.
        """
        side = self.metadata.resolution
        self._within_budget((1, 3, side, side), "the default resolution")
        for size in batch_sizes:
            if self._max_attention_bytes is not None:
                one = attention_bytes(
                    width=side,
                    height=side,
                    patch_size=self.metadata.patch_size,
                    num_heads=self.metadata.num_heads,
                )
                size = max(1, min(size, self._max_attention_bytes // one))
            values = self.run(
                np.zeros((size, 3, side, side), np.float32),
                contract.OUTPUT_NAMES,
                self._load_control,
            )
            check_output_shapes(values, self.metadata, batch=size, height=side, width=side)
            _check_finite(values, f"the warm-up batch of {size}")

    def _within_budget(self, shape: tuple[int, ...], what: str) -> None:
        """Refuse a load-time run whose attention would exceed the serving budget.

        A model whose metadata asks for a huge default or reference resolution would otherwise
        allocate it while it is checked, before any request could be refused.
        """
        if self._max_attention_bytes is None:
            return
        batch, _, height, width = shape
        needed = batch * attention_bytes(
            width=width,
            height=height,
            patch_size=self.metadata.patch_size,
            num_heads=self.metadata.num_heads,
        )
        if needed > self._max_attention_bytes:
            raise ModelLoadError(
                f"{what} ({batch} x {height}x{width}) needs {needed} bytes of attention, over "
                f"DINO_MAX_BATCH_ATTENTION_BYTES ({self._max_attention_bytes}): the model "
                "could not serve it"
            )


def _check_finite(values: dict[str, np.ndarray], what: str) -> None:
    """Refuse a model whose outputs on a load-time input are not finite.

    Raises:
        ModelLoadError: An output holds NaN or inf.
    """
    for name, value in values.items():
        if not np.isfinite(value).all():
            raise ModelLoadError(
                f"the model's {name} on {what} is not finite (NaN or inf): it could not answer "
                "requests for it"
            )


def _read_model_file(path: Path) -> bytes:
    """The bytes of a model file that is a regular file of a loadable size.

    Opened without blocking, so a FIFO in the repository cannot hold the scan forever.

    Raises:
        ModelLoadError: Unreadable, not a regular file, or over :data:`MAX_MODEL_FILE_BYTES`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        reason = err.strerror or str(err)
        with contextlib.suppress(OSError):
            if err.errno in (errno.ENOENT, errno.ELOOP) and path.is_symlink():
                reason = f"a symbolic link to {os.readlink(path)} that leads to no file ({reason})"
        raise ModelLoadError(f"cannot read {path}: {reason}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{path} is not a regular file")
        if info.st_size > MAX_MODEL_FILE_BYTES:
            raise ModelLoadError(
                f"{path} has {info.st_size} bytes, over the {MAX_MODEL_FILE_BYTES} of one ONNX "
                "file (weights kept as external data are not loaded)"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)


def load_model(
    path: Path,
    *,
    name: str,
    version: int,
    device: str,
    intra_op_threads: int = 0,
    cpu_memory_arena: bool = False,
    intra_op_spinning: bool = False,
    warmup_batch_sizes: tuple[int, ...] = (1,),
    max_attention_bytes: int | None = None,
    timeout_s: float | None = None,
    control: RunControl | None = None,
) -> OnnxModel:
    """Load, check, self-check and warm up one model file.

    Args:
        path: The ``model.onnx`` file.
        name: Model name in the repository.
        version: Version number.
        device: ``auto``, ``cuda`` or ``cpu``.
        intra_op_threads: onnxruntime intra-op threads (0: its default).
        cpu_memory_arena: Keep onnxruntime's CPU memory arena.
        intra_op_spinning: Let onnxruntime's intra-op threads spin while they wait for work.
        warmup_batch_sizes: Batch sizes run at the default resolution.
        max_attention_bytes: The serving attention budget; load-time runs beyond it (a huge
            default or reference resolution in the metadata) refuse the model. None: no limit.
        timeout_s: Longest the load-time runs may take together (a graph that never ends is
            stopped and refused). None: no limit.
        control: Lets another thread stop the load-time runs (the service shutting down).

    Raises:
        DeviceUnavailableError: ``device="cuda"`` and CUDA could not be bound.
        ModelLoadError: Anything else that makes the model unfit to serve.
    """
    providers = requested_providers(device)
    data = _read_model_file(Path(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    # Off by default: with the arena, one burst of large images keeps its peak memory (several
    # times the attention budget) for the life of the process; without it, about 3% slower.
    options.enable_cpu_mem_arena = cpu_memory_arena
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: node placement notes are not news
    # Spinning intra-op workers (onnxruntime's default) take the cores from the event loop and
    # the decode threads that share them: measured on 2 cores, twice the CPU time per image.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if intra_op_spinning else "0"
    )
    # onnxruntime's process-wide logger, not the session's, prints a warning at every CUDA
    # session (1.31: no *plugin* CUDA device is registered) before it binds its built-in CUDA
    # provider, which reads like a failure in the service's log. Its errors still print, and
    # at DINO_LOG_LEVEL=debug its warnings too.
    ort.set_default_logger_severity(2 if logger.isEnabledFor(logging.DEBUG) else 3)
    try:
        session = ort.InferenceSession(data, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for bad graphs
        raise ModelLoadError(f"onnxruntime cannot load {path}: {err}") from err
    bound = session.get_providers()
    if device == "cuda" and bound[0] != CUDA:
        raise DeviceUnavailableError(
            f"DINO_DEVICE=cuda but onnxruntime bound {bound}; the CUDA provider needs the CUDA 13 "
            "and cuDNN 9 libraries on the library path"
        )
    if device == "auto" and len(providers) > 1 and bound[0] != CUDA:
        logger.warning("a GPU is present but the CUDA provider could not be bound; using the CPU")
    metadata = parse_metadata(session.get_modelmeta().custom_metadata_map)
    check_contract(session, metadata)
    model = OnnxModel(
        session,
        metadata,
        name=name,
        version=version,
        path=Path(path),
        file_sha256=hashlib.sha256(data).hexdigest(),
    )
    del data  # the session holds its own copy
    control = control if control is not None else RunControl()
    model._load_control = control
    model._max_attention_bytes = max_attention_bytes
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        control.terminate()

    timer = threading.Timer(timeout_s, expire) if timeout_s is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        if control.terminated:  # stopped before the runs began
            raise ModelLoadError("the load was stopped (the service is shutting down)")
        model.self_check = model.check_reference()
        model.check_other_sizes()
        model.warm_up(warmup_batch_sizes)
    except Exception as err:  # a graph that fails at run time is unfit as well
        if expired.is_set():
            raise ModelLoadError(
                f"the load-time checks did not finish within {timeout_s:g} s "
                "(DINO_LOAD_TIMEOUT_S): a graph that does not end, or a far too slow device"
            ) from err
        if control.terminated:
            raise ModelLoadError("the load was stopped (the service is shutting down)") from err
        if isinstance(err, ModelLoadError):
            raise
        reason = str(err) or type(err).__name__  # MemoryError() has no text
        raise ModelLoadError(f"inference failed during the self-check: {reason}") from err
    finally:
        if timer is not None:
            timer.cancel()
        model._load_control = None
    return model
