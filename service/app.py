"""The HTTP application: ``create_app(settings)`` builds a FastAPI app with its lifespan.

Routes: ``POST /embed``, ``GET|HEAD /healthz``, ``GET|HEAD /readyz``, ``GET /v1/models``,
``GET /metrics``, ``POST /admin/reload``, the web page at ``/`` and ``/static/*``, and the OpenAPI
docs. Domain errors (:mod:`service.errors`) become ``{"error": {"code", "message", "index"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
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
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.attention import check_attention_budget
from service.batcher import Batcher
from service.decode_pool import DecodeProcesses
from service.encode import ImageRecord, encode_response, estimated_bytes, output_values
from service.errors import (
    ClientDisconnectedError,
    InferenceFailedError,
    NotReadyError,
    ResponseTooLargeError,
    ServiceError,
    UnauthorizedError,
)
from service.fanout import Fanout
from service.metrics import Metrics
from service.openapi import EMBED_OPENAPI, ERROR_RESPONSES
from service.options import EmbedOptions, max_side, parse_options, resolve_resolution
from service.prepare import Prepared, PrepareSpec, prepare_image
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
from service.upload import (
    BodyBudget,
    check_content_encoding,
    check_content_type,
    parse_upload,
    query_options,
    read_body,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Answers this small are encoded on the event loop instead of a hop to the worker pool: the
# hop (submit, wake-up, callback) costs about as much loop time as the work (at most about
# 0.7 ms for 4,096 values in any encoding), and pool-thread time on top. With a 32-pixel model
# on 2 cores, one client at a time, three interleaved pairs of runs: 2-11 % more requests/s and
# 2-10 % less server CPU per request, in every pair.
INLINE_ENCODE_VALUES = 4096  # 10 ViT-S CLS embeddings
_bearer = HTTPBearer(auto_error=False, description="API key, when DINO_API_KEYS is set.")


@dataclass
class ServiceState:
    """Everything the routes share, created in the lifespan."""

    settings: Settings
    metrics: Metrics
    manager: ModelManager
    batcher: Batcher
    pool: Fanout  # parses bodies, encodes answers, and decodes unless ``decoder`` is set
    bodies: BodyBudget
    decoder: DecodeProcesses | None = None


class _Timer:
    """Durations of a request's stages, for the ``Server-Timing`` header."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._last = self.started
        self.stages: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        """Close the stage that began at the previous mark (or at the start)."""
        now = time.perf_counter()
        self.stages.append((name, now - self._last))
        self._last = now

    def add(self, name: str, seconds: float) -> None:
        """Record a stage measured elsewhere."""
        self.stages.append((name, seconds))

    def header(self) -> str:
        """``name;dur=<ms>`` entries, then ``total``."""
        entries = [*self.stages, ("total", time.perf_counter() - self.started)]
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in entries)


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


async def require_key(
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
    # Starlette decodes header bytes as latin-1, so this recovers the bytes on the wire; the
    # configured keys are ASCII (checked by Settings), so only the same bytes can match.
    presented = credentials.credentials.encode("latin-1")
    matches = [hmac.compare_digest(presented, key.encode("ascii")) for key in keys]
    if not any(matches):
        raise UnauthorizedError("the API key is not valid")


router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_key)])


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse()


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "No model serves yet."}},
    tags=["health"],
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: a model is loaded, contract-checked, self-checked and warmed up.

    Every field is always present: ``reason`` is null when ready; ``model``, ``version`` and
    ``execution_provider`` are null when not.
    """
    state = _state(request)
    model = state.manager.current
    if model is None:
        if state.settings.api_keys:  # public route: the details (paths, errors) need a key
            reason = "no model serves yet; /v1/models (with an API key) says why"
        else:
            reason = await state.manager.not_ready_reason()
        body = ReadyResponse(ready=False, reason=reason)
        return JSONResponse(body.model_dump(), status_code=503)
    body = ReadyResponse(
        ready=True, model=model.name, version=model.version, execution_provider=model.provider
    )
    return JSONResponse(body.model_dump())


@protected.get("/v1/models", response_model=ModelsResponse, tags=["models"])
async def list_models(request: Request) -> ModelsResponse:
    """The serving model, every version's state, the policy and the last load error."""
    manager = _state(request).manager
    data = await manager.describe()
    model = manager.current
    data["loaded"] = _loaded_model(model) if model is not None else None
    return ModelsResponse.model_validate(data)


@protected.post("/admin/reload", response_model=ReloadResponse, tags=["models"])
async def reload_models(request: Request) -> ReloadResponse:
    """Rescan the repository now, retrying versions that failed before."""
    result = await _state(request).manager.refresh(force=True)
    return ReloadResponse(
        changed=result.changed,
        serving_version=result.serving_version,
        error=result.error,
        errors=list(result.errors),
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
    timer = _Timer()
    content_type = request.headers.get("content-type", "")
    query = request.query_params.multi_items()
    # What the headers alone decide is refused before the body is read (a client that sent
    # "Expect: 100-continue" is then never asked for it): media type and coding, query options,
    # a model.
    raw_image = check_content_type(content_type) is None  # options only in the query
    check_content_encoding(request.headers.get("content-encoding"))
    in_query = query_options(query)
    early = parse_options(in_query)
    current = state.manager.current
    if current is None:
        raise NotReadyError("no model is loaded yet; see /readyz and /v1/models")
    if early.resolution is not None:  # a query resolution is final (a second one is refused)
        side = resolve_resolution(
            early.resolution,
            default=current.metadata.resolution,
            patch_size=current.metadata.patch_size,
            max_resolution=settings.max_resolution,
        )
        if early.crop == "center" and (raw_image or "crop" in in_query):  # crop final too
            _check_center_budget(current, side, settings)
    with state.bodies.reservation() as reservation:
        body = await read_body(
            request,
            max_bytes=settings.max_body_bytes,
            reservation=reservation,
            timeout_s=settings.body_timeout_s,
        )
        # Parsed in the pool whatever its size: a small body can still hold 40 parts of padded
        # headers, which python-multipart walks byte by byte in Python (hundreds of ms).
        upload = await state.pool.call(
            functools.partial(
                parse_upload,
                body,
                content_type=content_type,
                query=query,
                max_images=settings.max_images_per_request,
            )
        )
        del body  # the parts are copies; the reservation still counts their bytes
        timer.mark("read")
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
        if options.crop == "center":  # every image has this size: refuse before decoding
            _check_center_budget(model, resolution, settings)
            side = resolution // model.metadata.patch_size
            check_response_size(model, [(side, side)] * len(upload.images), options, settings)
        with state.batcher.admitted(len(upload.images)):
            content = await _unless_disconnected(
                request,
                _embed_admitted(state, model, upload.images, options, resolution, timer),
                images=len(upload.images),
            )
    state.metrics.images.inc(len(upload.images))
    return Response(
        content, media_type="application/json", headers={"Server-Timing": timer.header()}
    )


async def _unless_disconnected(
    request: Request, work: Coroutine[Any, Any, bytes], *, images: int
) -> bytes:
    """Run ``work`` (its body already read) unless the client disconnects first.

    When the client goes away, ``work`` is cancelled: decodes not yet started are dropped, its
    images leave the batcher's queue, and its capacity is freed for clients still waiting.

    Raises:
        ClientDisconnectedError: The client disconnected before the answer was ready.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and (watcher.cancelled() or watcher.exception() is not None):
            # The server could not tell (an ASGI server without disconnect events): just wait.
            logger.debug("the disconnect watch ended without a disconnect")
            await asyncio.wait((task,))
    except BaseException:  # the route itself was cancelled (shutdown)
        task.cancel()
        watcher.cancel()
        await asyncio.wait((task,))  # its capacity is freed only once its work has stopped
        raise
    if task.done():  # the answer is ready, even if the client left at the same moment
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the route itself is being cancelled too: not the client's doing
    logger.info("client disconnected before the answer for its %d image(s); work withdrawn", images)
    raise ClientDisconnectedError("the client closed the connection before its answer was ready")


async def _disconnected(receive: Receive) -> None:
    """Return when the ASGI server reports that the client disconnected.

    Only called once the body has been read: the server then answers ``receive`` with
    ``http.disconnect`` when the client goes away (or once the response is complete).
    """
    while (await receive())["type"] != "http.disconnect":
        pass


async def _embed_admitted(
    state: ServiceState,
    model: OnnxModel,
    images: list[bytes],
    options: EmbedOptions,
    resolution: int,
    timer: _Timer,
) -> bytes:
    """Decode, preprocess, infer and encode the images of one admitted request."""
    settings = state.settings
    spec = _prepare_spec(model, options, resolution, settings)
    if state.decoder is not None:
        threads, prepare = state.decoder.threads, state.decoder.prepare
    else:
        threads, prepare = state.pool, prepare_image
    observed = functools.partial(_prepare_observed, prepare, state.metrics, spec)
    with state.batcher.preparing(len(images)):  # one hand-over and one wake-up per request
        prepared = await threads.map(observed, list(enumerate(images)))
    failure = next((o for o in prepared if isinstance(o, BaseException)), None)
    if failure is not None:  # in request order: the first bad image is reported
        del prepared
        try:
            raise failure
        finally:  # the traceback keeps this frame: it must not keep the error (a cycle)
            del failure
    ready = [p for p in prepared if isinstance(p, Prepared)]
    timer.mark("decode")
    patch = model.metadata.patch_size
    grids = [(p.processed_size[1] // patch, p.processed_size[0] // patch) for p in ready]
    if options.crop == "none":  # sizes known only now (crop=center was checked on arrival)
        check_response_size(model, grids, options, settings)
    submitted = time.perf_counter()
    results = await state.batcher.submit(model, [p.pixels for p in ready], options.outputs)
    for index, result in enumerate(results):  # JSON cannot carry them; base64 would hide them
        if not all(np.isfinite(value).all() for value in result.outputs.values()):
            reference = uuid.uuid4().hex[:12]
            logger.error(
                "version %d of %s gave values that are not finite (NaN or inf) for image %d of "
                "a request (reference %s)",
                model.version,
                model.name,
                index,
                reference,
            )
            raise InferenceFailedError(
                "the model gave values that are not finite (NaN or inf) for this image "
                f"(reference {reference}); the details are in the service log",
                index=index,
            )
    slowest = max(results, key=lambda result: result.infer_s)
    infer = slowest.infer_s
    timer.add("queue", max(time.perf_counter() - submitted - infer, 0.0))
    timer.add("infer", infer)
    timer.add("session", slowest.session_s)  # part of infer: the onnxruntime call
    records = [
        ImageRecord(
            index=index,
            original_size=p.original_size,
            processed_size=p.processed_size,
            grid=grid,
            outputs=result.outputs,
        )
        for index, (p, grid, result) in enumerate(zip(ready, grids, results, strict=True))
    ]
    started = time.perf_counter()
    encode = functools.partial(
        encode_response,
        model=_summary(model),
        options=options,
        resolution=resolution,
        records=records,
    )
    if sum(value.size for r in records for value in r.outputs.values()) <= INLINE_ENCODE_VALUES:
        content = encode()
    else:
        content = await state.pool.call(encode)
    encoded = time.perf_counter() - started
    state.metrics.stage_seconds.labels("encode").observe(encoded)
    timer.add("encode", encoded)
    return content


def _check_center_budget(model: OnnxModel, side: int, settings: Settings) -> None:
    """Refuse a centre crop of ``side`` whose attention alone exceeds the budget (every image).

    Raises:
        TooManyTokensError: Over ``max_batch_attention_bytes``.
    """
    check_attention_budget(
        (side, side),
        patch_size=model.metadata.patch_size,
        num_heads=model.metadata.num_heads,
        budget=settings.max_batch_attention_bytes,
        index=None,
    )


def check_response_size(
    model: OnnxModel, grids: list[tuple[int, int]], options: EmbedOptions, settings: Settings
) -> None:
    """Refuse an answer whose arrays would exceed ``max_response_bytes``.

    Args:
        model: The serving model.
        grids: ``(rows, cols)`` of patches of each image.
        options: The request's options (outputs, encoding, dtype).
        settings: Limits.

    Raises:
        ResponseTooLargeError: The estimate is over the limit.
    """
    meta = model.metadata
    values = sum(
        output_values(
            options.outputs, rows=r, cols=c, embed_dim=meta.embed_dim, num_heads=meta.num_heads
        )
        for r, c in grids
    )
    size = estimated_bytes(values, encoding=options.encoding, dtype=options.dtype)
    limit = settings.max_response_bytes
    if size > limit:
        smaller = [
            f"{k}={v}"
            for k, v in (("encoding", "base64"), ("dtype", "float16"))
            if getattr(options, k) != v
        ]
        raise ResponseTooLargeError(
            f"the answer would hold {values} values, about {size / 2**20:.1f} MiB as "
            f"{options.encoding} {options.dtype}, over the limit of {limit / 2**20:.1f} MiB "
            "(DINO_MAX_RESPONSE_BYTES); ask for fewer images, fewer outputs or a smaller "
            "resolution" + (f", or use {' and '.join(smaller)}" if smaller else "")
        )


def _prepare_observed(
    prepare: Callable[[bytes, int, PrepareSpec], Prepared],
    metrics: Metrics,
    spec: PrepareSpec,
    job: tuple[int, bytes],
) -> Prepared:
    """Prepare one image (``job`` is its index and bytes; in a pool thread) and record its
    stage times as soon as it is ready, whatever happens to the rest of its request."""
    index, data = job
    prepared = prepare(data, index, spec)
    metrics.stage_seconds.labels("decode").observe(prepared.decode_s)
    metrics.stage_seconds.labels("preprocess").observe(prepared.preprocess_s)
    return prepared


def _prepare_spec(
    model: OnnxModel, options: EmbedOptions, resolution: int, settings: Settings
) -> PrepareSpec:
    meta = model.metadata
    return PrepareSpec(
        recipe=meta.recipe,
        resolution=resolution,
        crop=options.crop,
        patch_size=meta.patch_size,
        num_heads=meta.num_heads,
        max_side=max_side(settings.max_resolution, meta.resolution),
        max_image_pixels=settings.max_image_pixels,
        jpeg_draft=settings.jpeg_draft,
        max_attention_bytes=settings.max_batch_attention_bytes,
    )


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


# The page runs only its own files: no inline script or style, no other origin, no framing (it
# has an API-key field), and every load revalidated so that an upgrade never pairs a cached
# app.js with a new analysis.js.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False, response_model=None)
async def index() -> Response:
    """The web page (service/static/index.html)."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return _error_response(404, "not_found", "the web page is not installed", None)
    return FileResponse(page, media_type="text/html", headers=PAGE_HEADERS)


@router.api_route(
    "/static/{path:path}", methods=["GET", "HEAD"], include_in_schema=False, response_model=None
)
async def static_file(path: str) -> Response:
    """Files of the web page; never anything outside service/static.

    The requested path is only ever used as a key into the listing of the directory, never
    handed to the file system, so odd names (``..``, NUL bytes, overlong names) are just 404s.
    """
    target = _static_files(STATIC_DIR).get(path)
    if target is None:
        return _error_response(404, "not_found", f"no static file {path[:100]!r}", None)
    return FileResponse(target, headers=PAGE_HEADERS)


def _static_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every regular file under ``root``."""
    if not root.is_dir():
        return {}
    return {
        entry.relative_to(root).as_posix(): entry for entry in root.rglob("*") if entry.is_file()
    }


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
        if exc.status == 503:
            # Not ready or shutting down: ordinary while no model serves, and the reason is
            # logged once by the model manager, not once per request.
            logger.debug("%s: %s", exc.code, exc.message)
        elif exc.status >= 500:
            logger.error("%s: %s", exc.code, exc.message)
        return _error_response(exc.status, exc.code, exc.message, exc.index, exc.headers())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = exc.headers
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers = {**(headers or {}), "Allow": allowed}
        return _error_response(exc.status_code, code, str(exc.detail), None, headers)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()
        )
        return _error_response(422, "invalid_option", message or "invalid request", None)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    # Any other exception: answered 500 internal_error by _RequestMetrics (see there).


def _allowed_methods(request: Request) -> str:
    """Every method of this module's routes at the request's path, empty if none is there.

    Starlette's 405 names only the first matching route's methods, which left out ``HEAD``
    (a route of its own beside ``GET``).
    """
    methods: set[str] = set()
    for route in (*router.routes, *protected.routes):
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


class _RequestMetrics:
    """ASGI middleware counting requests by route template and status, and their latency.

    It also answers any exception the routes and handlers leave (a bug) with a JSON 500
    ``internal_error``, logged once with its traceback.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answering = False  # the response's start has been sent

        async def send_and_record(message: Message) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status = int(message["status"])
                answering = True
            await send(message)

        cancelled = False
        try:
            await self.app(scope, receive, send_and_record)
        except asyncio.CancelledError:
            cancelled = True  # shutdown: not an answer, not counted as one
            raise
        except Exception:
            # Answered here rather than by Starlette's outermost handler, which re-raises after
            # answering: uvicorn would then log the error a second time and close the
            # keep-alive connection under the client's next request.
            if answering:
                raise  # part of an answer is out: only closing the connection is left
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = _error_response(500, "internal_error", "internal server error", None)
            await response(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = "other"  # unmatched paths: one label, not one per probe
            if answering or not cancelled:
                self.metrics.requests.labels(path, str(status)).inc()
                self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Factory


def create_app(
    settings: Settings | None = None,
    *,
    loader: Loader = load_model,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the application.

    Args:
        settings: Configuration; read from the environment when omitted.
        loader: Model loader (tests may wrap :func:`service.runtime.load_model`).
        on_fatal: Called with the reason when the service cannot run at all
            (``DINO_DEVICE=cuda`` and the CUDA provider cannot be bound); ``python -m service``
            stops the server with exit status 3. Without it, that is an ordinary load failure.

    Returns:
        The FastAPI app; models load and the batcher starts in its lifespan.
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = Fanout(settings.worker_count(), name="decode")
        batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_attention_bytes=settings.max_batch_attention_bytes,
            capacity=settings.max_queue_images,
            retry_after_s=settings.retry_after_s,
            metrics=metrics,
            flush_when_idle=not settings.wait_when_idle,
            pipeline_depth=settings.inference_pipeline_depth,
        )
        manager = ModelManager(settings, metrics, loader, on_fatal)
        bodies = BodyBudget(
            settings.max_body_bytes_in_flight, settings.retry_after_s, metrics.body_bytes.set
        )
        decoder = None
        if settings.decode_processes:
            decoder = DecodeProcesses(
                settings.decode_processes,
                timeout_s=settings.decode_time_limit(),
                on_restart=metrics.decode_restarts.inc,
            )
        app.state.service = ServiceState(settings, metrics, manager, batcher, pool, bodies, decoder)
        try:
            if decoder is not None:
                await asyncio.to_thread(decoder.start)  # a failure stops the start-up
            await batcher.start()
            try:
                await manager.start()
                yield
            finally:
                await manager.stop()
                await batcher.stop()
        finally:
            pool.close()
            if decoder is not None:
                await asyncio.to_thread(decoder.close)

    app = FastAPI(
        title="DINO feature service",
        version="1",
        summary="CLS embeddings, patch features and attention maps of a DINO ViT over HTTP.",
        lifespan=lifespan,
        # "/embed/" is an unknown path (a JSON 404), not a redirect built from the Host header.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.include_router(router)
    app.include_router(protected)
    _install_error_handlers(app, metrics)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    return app
