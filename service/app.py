"""The HTTP application: ``create_app(settings)`` builds a FastAPI app with its lifespan.

Routes: ``POST /embed``, ``GET /healthz``, ``GET /readyz``, ``GET /v1/models``, ``GET /metrics``,
``POST /admin/reload``, the web page at ``/`` and ``/static/*``, and the OpenAPI docs.
Domain errors (:mod:`service.errors`) become ``{"error": {"code", "message", "index"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import Batcher
from service.decode import decode_image
from service.encode import ImageRecord, encode_response
from service.errors import NotReadyError, ServiceError, UnauthorizedError
from service.metrics import Metrics
from service.openapi import EMBED_OPENAPI, ERROR_RESPONSES
from service.options import EmbedOptions, parse_options, resolve_resolution
from service.preprocess import plan_geometry, to_pixels
from service.repository import Loader, ModelManager
from service.runtime import OnnxModel, load_model
from service.schemas import (
    EmbedResponse,
    HealthResponse,
    ModelsResponse,
    ReadyResponse,
    ReloadResponse,
)
from service.settings import Settings
from service.upload import parse_upload, read_body

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_bearer = HTTPBearer(auto_error=False, description="API key, when DINO_API_KEYS is set.")


@dataclass
class ServiceState:
    """Everything the routes share, created in the lifespan."""

    settings: Settings
    metrics: Metrics
    manager: ModelManager
    batcher: Batcher
    pool: ThreadPoolExecutor


@dataclass(frozen=True)
class _Prepared:
    pixels: np.ndarray  # (3, H, W)
    original_size: tuple[int, int]
    processed_size: tuple[int, int]


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def require_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
) -> None:
    """Accept the request when no keys are configured or a configured key is presented.

    Raises:
        UnauthorizedError: Keys are configured and none matches.
    """
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise UnauthorizedError("this route needs an API key: send 'Authorization: Bearer <key>'")
    presented = credentials.credentials.encode("utf-8")
    matches = [hmac.compare_digest(presented, key.encode("utf-8")) for key in keys]
    if not any(matches):
        raise UnauthorizedError("the API key is not valid")


router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_key)])


@router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "No model serves yet."}},
    tags=["health"],
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: a model is loaded, contract-checked, self-checked and warmed up."""
    manager = _state(request).manager
    model = manager.current
    if model is None:
        reason = manager.describe()["last_error"] or "no model version found in the repository"
        body = ReadyResponse(ready=False, reason=str(reason))
        return JSONResponse(body.model_dump(), status_code=503)
    body = ReadyResponse(
        ready=True, model=model.name, version=model.version, execution_provider=model.provider
    )
    return JSONResponse(body.model_dump())


@protected.get("/v1/models", response_model=ModelsResponse, tags=["models"])
async def list_models(request: Request) -> ModelsResponse:
    """The serving model, every version's state, the policy and the last load error."""
    manager = _state(request).manager
    data = manager.describe()
    model = manager.current
    data["loaded"] = _loaded_model(model) if model is not None else None
    return ModelsResponse.model_validate(data)


@protected.post("/admin/reload", response_model=ReloadResponse, tags=["models"])
async def reload_models(request: Request) -> ReloadResponse:
    """Rescan the repository now, retrying versions that failed before."""
    result = await _state(request).manager.refresh(force=True)
    return ReloadResponse(
        changed=result.changed, serving_version=result.serving_version, error=result.error
    )


@protected.get("/metrics", tags=["health"], response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics (text format)."""
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@protected.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=EMBED_OPENAPI,
    tags=["embed"],
)
async def embed(request: Request) -> Response:
    """Embed 1..N images: CLS embedding, patch features and/or attention maps.

    The whole request fails (with ``index`` naming the first bad image) if any image is bad;
    nothing is queued for a request that fails validation.
    """
    state = _state(request)
    settings = state.settings
    loop = asyncio.get_running_loop()
    body = await read_body(request, max_bytes=settings.max_body_bytes)
    upload = await loop.run_in_executor(
        state.pool,
        functools.partial(
            parse_upload,
            body,
            content_type=request.headers.get("content-type", ""),
            query=request.query_params.multi_items(),
            max_images=settings.max_images_per_request,
        ),
    )
    options = parse_options(upload.options)
    model = state.manager.current
    if model is None:
        raise NotReadyError("no model is loaded yet; see /readyz and /v1/models")
    resolution = resolve_resolution(
        options.resolution,
        default=model.metadata.resolution,
        patch_size=model.metadata.patch_size,
        max_resolution=settings.max_resolution,
    )
    with state.batcher.admitted(len(upload.images)):
        jobs = [
            loop.run_in_executor(
                state.pool,
                functools.partial(
                    _prepare, data, index, model, options, resolution, settings, state.metrics
                ),
            )
            for index, data in enumerate(upload.images)
        ]
        prepared = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in prepared:  # in request order: the first bad image is reported
            if isinstance(outcome, BaseException):
                raise outcome
        ready = [p for p in prepared if isinstance(p, _Prepared)]
        outputs = await state.batcher.submit(model, [p.pixels for p in ready], options.outputs)
        patch = model.metadata.patch_size
        records = [
            ImageRecord(
                index=index,
                original_size=p.original_size,
                processed_size=p.processed_size,
                grid=(p.processed_size[1] // patch, p.processed_size[0] // patch),
                outputs=out,
            )
            for index, (p, out) in enumerate(zip(ready, outputs, strict=True))
        ]
        started = time.perf_counter()
        content = await loop.run_in_executor(
            state.pool,
            functools.partial(
                encode_response,
                model=_summary(model),
                options=options,
                resolution=resolution,
                records=records,
            ),
        )
        state.metrics.stage_seconds.labels("encode").observe(time.perf_counter() - started)
    state.metrics.images.inc(len(records))
    return Response(content, media_type="application/json")


def _prepare(
    data: bytes,
    index: int,
    model: OnnxModel,
    options: EmbedOptions,
    resolution: int,
    settings: Settings,
    metrics: Metrics,
) -> _Prepared:
    """Decode and preprocess one image (runs in the worker pool)."""
    started = time.perf_counter()
    image = decode_image(data, max_pixels=settings.max_image_pixels, index=index)
    decoded = time.perf_counter()
    metrics.stage_seconds.labels("decode").observe(decoded - started)
    geometry = plan_geometry(
        image.width,
        image.height,
        recipe=model.metadata.recipe,
        resolution=resolution,
        crop=options.crop,
        patch_size=model.metadata.patch_size,
        max_side=settings.max_resolution,
    )
    pixels = to_pixels(image, geometry, model.metadata.recipe)
    metrics.stage_seconds.labels("preprocess").observe(time.perf_counter() - decoded)
    return _Prepared(pixels, (image.width, image.height), geometry.size)


def _summary(model: OnnxModel) -> dict[str, Any]:
    meta = model.metadata
    return {
        "name": model.name,
        "version": model.version,
        "sha256": meta.weights_sha256,
        "embed_dim": meta.embed_dim,
        "patch_size": meta.patch_size,
        "num_heads": meta.num_heads,
        "execution_provider": model.provider,
    }


def _loaded_model(model: OnnxModel) -> dict[str, Any]:
    meta = model.metadata
    check = model.self_check
    return {
        "name": model.name,
        "version": model.version,
        "path": str(model.path),
        "weights_sha256": meta.weights_sha256,
        "onnx_sha256": model.file_sha256,
        "arch": meta.arch,
        "precision": meta.precision,
        "source": meta.source,
        "embed_dim": meta.embed_dim,
        "patch_size": meta.patch_size,
        "depth": meta.depth,
        "num_heads": meta.num_heads,
        "default_resolution": meta.resolution,
        "execution_provider": model.provider,
        "providers": model.session.get_providers(),
        "preprocessing": {
            "resolution": meta.recipe.resolution,
            "resize_size": meta.recipe.resize_size,
            "interpolation": meta.recipe.interpolation,
            "mean": list(meta.recipe.mean),
            "std": list(meta.recipe.std),
        },
        "self_check": None if check is None else dataclasses.asdict(check),
    }


# ---------------------------------------------------------------------------------------------
# Web page


@router.get("/", include_in_schema=False, response_model=None)
async def index() -> Response:
    """The web page (service/static/index.html)."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return _error_response(404, "not_found", "the web page is not installed", None)
    return FileResponse(page, media_type="text/html")


@router.get("/static/{path:path}", include_in_schema=False, response_model=None)
async def static_file(path: str) -> Response:
    """Files of the web page; never anything outside service/static."""
    root = STATIC_DIR.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return _error_response(404, "not_found", f"no static file {path!r}", None)
    return FileResponse(target)


# ---------------------------------------------------------------------------------------------
# Errors


def _error_response(
    status: int,
    code: str,
    message: str,
    index: int | None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "index": index}}
    return JSONResponse(body, status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def service_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        if exc.index is not None:
            metrics.rejected.labels(exc.code).inc()
        if exc.status >= 500:
            logger.error("%s: %s", exc.code, exc.message)
        return _error_response(exc.status, exc.code, exc.message, exc.index, exc.headers())

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return _error_response(exc.status_code, code, str(exc.detail), None, exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()
        )
        return _error_response(422, "invalid_option", message or "invalid request", None)

    async def unexpected(request: Request, _exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal_error", "internal server error", None)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


class _RequestMetrics:
    """ASGI middleware counting requests by route template and status, and their latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = "other"  # unmatched paths: one label, not one per probe
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Factory


def create_app(settings: Settings | None = None, *, loader: Loader = load_model) -> FastAPI:
    """Build the application.

    Args:
        settings: Configuration; read from the environment when omitted.
        loader: Model loader (tests may wrap :func:`service.runtime.load_model`).

    Returns:
        The FastAPI app; models load and the batcher starts in its lifespan.
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(settings.worker_count(), thread_name_prefix="decode")
        batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            capacity=settings.max_queue_images,
            retry_after_s=settings.retry_after_s,
            metrics=metrics,
        )
        manager = ModelManager(settings, metrics, loader)
        app.state.service = ServiceState(settings, metrics, manager, batcher, pool)
        await batcher.start()
        try:
            await manager.start()
            yield
        finally:
            await manager.stop()
            await batcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="DINO feature service",
        version="1",
        summary="CLS embeddings, patch features and attention maps of a DINO ViT over HTTP.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    app.include_router(protected)
    _install_error_handlers(app, metrics)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    return app
