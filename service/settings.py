"""Service configuration from ``DINO_*`` environment variables (pydantic-settings).

Build a :class:`Settings` in ``main``/``create_app``, never at import time.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.contract import validate_model_name

Device = Literal["auto", "cuda", "cpu"]
# Names both Python's logging and uvicorn accept.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
VersionPolicy = Literal["latest", "pinned"]
# RFC 6750 b64token (token68): what a client can put after "Bearer " without quoting.
_API_KEY = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class Settings(BaseSettings):
    """Every knob of the service; each field is read from ``DINO_<FIELD NAME>``.

    Attributes:
        host: Interface to bind (``0.0.0.0`` in a container).
        port: TCP port.
        log_level: Python logging level name.
        model_repository: Root of the model repository (``<name>/<version>/model.onnx``).
        model_name: Which model of the repository to serve.
        version_policy: ``latest`` serves the newest version that loads and passes its checks;
            ``pinned`` serves exactly ``model_version``.
        model_version: The pinned version (required with ``version_policy=pinned``).
        poll_interval_s: How often the repository is rescanned; 0 disables polling.
        load_timeout_s: Longest a model's load-time checks (self-check, other size, warm-up)
            may run; a model beyond it is refused.
        device: ``auto`` (CUDA when it can be bound, else CPU), ``cuda`` (fail unless CUDA is
            really bound) or ``cpu``.
        intra_op_threads: onnxruntime intra-op threads per session; 0 lets onnxruntime decide.
        intra_op_spinning: Let those threads spin while they wait for work (onnxruntime's own
            default): only for cores that do nothing but inference.
        cpu_memory_arena: Let onnxruntime's CPU provider keep the memory of its largest batch
            for reuse (a few percent faster; otherwise memory goes back after each batch).
        max_response_bytes: Largest answer (its arrays estimated before they are computed or
            encoded: exactly for base64, 24 bytes a value for JSON lists).
        decode_workers: Threads that parse request bodies and encode answers, and decode and
            resize images unless ``decode_processes`` is set; 0 means one per CPU core.
        decode_processes: Worker processes that decode, resize and crop images instead of
            those threads (they normalise too; the service copies their pixels); 0 (the default)
            decodes in threads. For a fast accelerator, where decoding in one process holds the
            GIL long enough to cap throughput. Each holds about 40 MB of memory,
            more after a large image (about 100 MB after a 12-megapixel photo).
        decode_timeout_s: With ``decode_processes``, longest a worker may take over one image
            (wall-clock, from handing it the file to the last byte of its answer; at most a
            day); beyond it the worker is killed and replaced and the image is refused (422
            ``image_too_complex``). 0: no limit. Threads cannot be stopped, so without
            ``decode_processes`` there is no limit.
        max_body_bytes: Largest request body accepted (413 beyond).
        max_body_bytes_in_flight: Body bytes held by all requests at once, from the first
            byte read until the answer (429 beyond); bounds memory before admission.
        body_timeout_s: Longest a request body may take to arrive (408 beyond).
        keep_alive_s: uvicorn's idle keep-alive timeout between requests on one connection.
        shutdown_timeout_s: Longest a stop (SIGTERM) waits for requests in flight and answers
            being sent; the connections still open then are closed. Keep it below the
            orchestrator's grace period (``docker stop`` waits 10 s unless told otherwise).
        max_images_per_request: Most images in one request (422 beyond).
        max_image_pixels: Largest width*height accepted, checked before pixels are decoded.
        jpeg_draft: Decode a JPEG (or MPO) much larger than the model's input at 1/2, 1/4 or
            1/8 of its size (libjpeg's DCT scaling; only a reduction that divides both sides),
            never below what the resize needs: several times
            faster for photos, but not bit-identical to the reference preprocessing (a full
            decode, then the resize), so off by default.
        max_resolution: Largest processed side in pixels (``resolution`` and ``crop=none``);
            never below the model's default resolution, which is always served.
        max_batch_attention_bytes: Attention-matrix bytes allowed per inference call
            (``batch * heads * tokens**2 * 4``): batches of large images are split to stay
            within it, and an image that alone exceeds it is refused with 413.
        max_batch_size: Most images in one inference call.
        max_queue_delay_ms: Longest an image waits for companions before its batch runs.
        wait_when_idle: Let a batch wait ``max_queue_delay_ms`` even when no admitted image is
            being decoded (none could join it soon); off, such a batch runs at once.
        inference_pipeline_depth: Batches handed to the inference thread at once, the running
            one included: with 2, the next batch starts the moment a call returns instead of
            when the event loop next gets to it; 1 forms each batch after the previous returned;
            0 (auto): 2 for a model on the CUDA provider, 1 on the CPU.
        max_queue_images: Images admitted (decoding, queued or running) before 429.
        retry_after_s: ``Retry-After`` seconds sent with a 429.
        api_keys: Accepted bearer keys, comma-separated; empty disables authentication (a
            value of only commas or spaces is refused). Keys are visible ASCII (letters, digits
            and ``-._~+/``, optionally ending in ``=``).
        warmup_batch_sizes: Batch sizes run at the default resolution before a model serves.
    """

    model_config = SettingsConfigDict(env_prefix="DINO_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"

    model_repository: Path = Path("model_repository")
    model_name: str = "dino_default"
    version_policy: VersionPolicy = "latest"
    model_version: int | None = Field(default=None, ge=1)
    poll_interval_s: float = Field(default=10.0, ge=0)
    load_timeout_s: float = Field(default=300.0, gt=0)

    device: Device = "auto"
    intra_op_threads: int = Field(default=0, ge=0)
    intra_op_spinning: bool = False
    cpu_memory_arena: bool = False
    max_response_bytes: int = Field(default=64 * 2**20, ge=2**16)
    decode_workers: int = Field(default=0, ge=0)
    decode_processes: int = Field(default=0, ge=0, le=512)
    decode_timeout_s: float = Field(default=30.0, ge=0, le=86_400)

    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_body_bytes_in_flight: int = Field(default=256 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(default=60.0, gt=0)
    keep_alive_s: int = Field(default=5, ge=1)
    shutdown_timeout_s: int = Field(default=25, ge=1)
    max_images_per_request: int = Field(default=32, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    jpeg_draft: bool = False
    max_resolution: int = Field(default=1024, ge=8)
    max_batch_attention_bytes: int = Field(default=1024**3, ge=1)

    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    wait_when_idle: bool = False
    inference_pipeline_depth: int = Field(default=0, ge=0, le=8)
    max_queue_images: int = Field(default=256, ge=1)
    retry_after_s: int = Field(default=1, ge=0)

    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    warmup_batch_sizes: Annotated[tuple[int, ...], NoDecode] = (1,)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = tuple(key.strip() for key in value.split(",") if key.strip())
            if value and not keys:  # fail closed: a typo must not turn authentication off
                raise ValueError(
                    f"DINO_API_KEYS={value!r} holds no key (only commas or spaces); leave it "
                    "empty (or unset) to disable authentication"
                )
            return keys
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for position, key in enumerate(value, start=1):
            if _API_KEY.fullmatch(key) is None:
                raise ValueError(
                    f"DINO_API_KEYS: key {position} is not a valid bearer token; use only ASCII "
                    "letters, digits and - . _ ~ + / (optionally ending in =), no spaces"
                )
        return value

    @field_validator("warmup_batch_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(size) for size in value.split(",") if size.strip())
        return value

    @field_validator("model_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return validate_model_name(value)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(
                f"DINO_LOG_LEVEL={value[:40]!r} is not a log level; use one of "
                f"{', '.join(LOG_LEVELS)}"
            )
        return level

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.version_policy == "pinned" and self.model_version is None:
            raise ValueError("DINO_VERSION_POLICY=pinned needs DINO_MODEL_VERSION")
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(
                f"DINO_MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) must not exceed "
                f"DINO_MAX_QUEUE_IMAGES ({self.max_queue_images})"
            )
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"DINO_MAX_BODY_BYTES_IN_FLIGHT ({self.max_body_bytes_in_flight}) must be at "
                f"least DINO_MAX_BODY_BYTES ({self.max_body_bytes})"
            )
        if any(size < 1 for size in self.warmup_batch_sizes):
            raise ValueError("DINO_WARMUP_BATCH_SIZES must be positive integers")
        return self

    def worker_count(self) -> int:
        """Decode/resize threads to start."""
        return self.decode_workers or max(os.cpu_count() or 1, 1)

    def decode_time_limit(self) -> float | None:
        """Seconds a decode process may spend on one image; None when unlimited (0)."""
        return self.decode_timeout_s or None


def misspelt_settings(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``DINO_*`` variables that are no setting but nearly spell one.

    pydantic-settings ignores unknown variables, so ``DINO_MAX_BATCHSIZE=8`` would leave the
    default in force without a word. Variables that resemble no setting (other tools' own
    ``DINO_*`` names, such as compose's ``DINO_CPUS``) are left alone.

    Args:
        environ: The process environment.

    Returns:
        One message per near miss, naming the setting it resembles.
    """
    known = [f"DINO_{name.upper()}" for name in Settings.model_fields]
    messages = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("DINO_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.85)
        if close:
            messages.append(f"{name} is not a setting (did you mean {close[0]}?); it is ignored")
    return messages
