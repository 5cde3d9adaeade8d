"""Pydantic models of the HTTP contract (they document the OpenAPI schema).

``/embed`` responses are assembled as plain dicts by :mod:`service.encode` for speed; these
models describe exactly that JSON and the tests validate responses against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable error code (see docs/api.md).")
    message: str = Field(description="Human-readable explanation naming the bad value.")
    index: int | None = Field(
        default=None, description="0-based position of the offending image, if any."
    )


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: ErrorDetail


class ModelSummary(BaseModel):
    """The model that produced a response."""

    name: str
    version: int
    sha256: str = Field(description="SHA-256 of the source weights (from the ONNX metadata).")
    embed_dim: int
    patch_size: int
    num_heads: int
    execution_provider: str = Field(description="onnxruntime provider actually bound.")


class Size(BaseModel):
    """Image size in pixels."""

    width: int
    height: int


class Grid(BaseModel):
    """Patch grid of the processed image."""

    rows: int
    cols: int


class EncodedArray(BaseModel):
    """A tensor as little-endian raw bytes, base64-encoded, row-major (C order)."""

    encoding: Literal["base64"] = "base64"
    dtype: Literal["float32", "float16"]
    shape: list[int]
    data: str = Field(description="base64 of the little-endian bytes.")


class ImageResult(BaseModel):
    """Outputs for one image; only the requested outputs are present."""

    index: int = Field(description="Position of the image in the request.")
    original_size: Size
    processed_size: Size
    grid: Grid
    cls_embedding: list[float] | EncodedArray | None = Field(
        default=None, description="[embed_dim]; L2-normalised when normalize=true."
    )
    patch_features: list[list[list[float]]] | EncodedArray | None = Field(
        default=None, description="[rows, cols, embed_dim], after the final LayerNorm."
    )
    attention_maps: list[list[list[float]]] | EncodedArray | None = Field(
        default=None,
        description="[num_heads, rows, cols]: last block's CLS-query attention over patches.",
    )


class AppliedOptions(BaseModel):
    """The options as the service applied them (resolution after rounding)."""

    outputs: list[str]
    normalize: bool
    resolution: int
    crop: Literal["center", "none"]
    encoding: Literal["json", "base64"]
    dtype: Literal["float32", "float16"]


class EmbedResponse(BaseModel):
    """Answer of ``POST /embed``."""

    model: ModelSummary
    options: AppliedOptions
    results: list[ImageResult] = Field(description="One per image, in request order.")


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    """Readiness: a checked, warmed-up model serves."""

    ready: bool
    model: str | None = None
    version: int | None = None
    execution_provider: str | None = None
    reason: str | None = None


class SelfCheckReport(BaseModel):
    """Load-time comparison with the outputs recorded at export."""

    cases: int
    max_abs_error: float
    min_cosine: float
    tolerance_abs: float
    tolerance_cosine: float


class Preprocessing(BaseModel):
    """The preprocessing recipe read from the model."""

    resolution: int
    resize_size: int
    interpolation: str
    mean: list[float]
    std: list[float]


class LoadedModel(BaseModel):
    """Details of the serving model."""

    name: str
    version: int
    path: str
    weights_sha256: str
    onnx_sha256: str
    arch: str
    precision: str
    source: str
    embed_dim: int
    patch_size: int
    depth: int
    num_heads: int
    default_resolution: int
    execution_provider: str
    providers: list[str]
    preprocessing: Preprocessing
    self_check: SelfCheckReport | None


class VersionState(BaseModel):
    """One version found in the repository, or serving from memory.

    ``error`` says why a failed version cannot be served; on the serving row, what is wrong
    with its file on disk (changed and refused, or removed) while the loaded copy serves.
    """

    version: int
    state: Literal["serving", "available", "failed"]
    error: str | None = None


class ModelsResponse(BaseModel):
    """Answer of ``GET /v1/models``."""

    name: str
    repository: str
    version_policy: Literal["latest", "pinned"]
    pinned_version: int | None
    device: Literal["auto", "cuda", "cpu"]
    ready: bool
    loaded_at: float | None
    last_refresh: float | None
    last_error: str | None
    reason: str | None = Field(
        description="Why no model serves (as `/readyz` says it without an API key); "
        "null when ready."
    )
    versions: list[VersionState]
    loaded: LoadedModel | None


class ReloadResponse(BaseModel):
    """Answer of ``POST /admin/reload``."""

    changed: bool
    serving_version: int | None
    error: str | None = Field(
        description='The failures of this scan joined by "; ", or null when there were none.'
    )
    errors: list[str] = Field(
        default_factory=list,
        description="Each failure of this scan (`version N: reason`), newest version first.",
    )
