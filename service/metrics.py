"""Prometheus metrics, kept in a registry owned by one app (so tests can build several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the service exports, under the ``dino_`` prefix."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "dino_http_requests",
            "HTTP requests by route template and status code.",
            ("route", "status"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "dino_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter("dino_images", "Images embedded successfully.", registry=registry)
        self.in_flight = Gauge(
            "dino_images_in_flight",
            "Images admitted and not yet answered (decoding, queued or running).",
            registry=registry,
        )
        self.body_bytes = Gauge(
            "dino_request_body_bytes_in_flight",
            "Request body bytes reserved by requests being read or served "
            "(bounded by DINO_MAX_BODY_BYTES_IN_FLIGHT).",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "dino_queue_depth", "Images waiting in the batcher queue.", registry=registry
        )
        self.queue_wait = Histogram(
            "dino_queue_wait_seconds",
            "Time an image waited in the batcher queue before its batch started.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.withdrawn = Counter(
            "dino_withdrawn_images",
            "Images taken out of the batcher queue before inference because their request "
            "ended (the client disconnected, or another of its images failed).",
            registry=registry,
        )
        self.stopped_batches = Counter(
            "dino_stopped_batches",
            "Inference calls stopped before the end because every request they served had "
            "ended (the clients disconnected).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "dino_batch_size",
            "Images per inference call.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "dino_stage_duration_seconds",
            "Time per stage: decode (bytes to RGB), preprocess (resize/normalise, per image), "
            "inference (per batch, in the inference thread), session (the onnxruntime call, "
            "part of inference) and encode (per response).",
            ("stage",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.decode_restarts = Counter(
            "dino_decode_process_restarts",
            "Decode processes (DINO_DECODE_PROCESSES) replaced after they ended unexpectedly, "
            "their exchange with the service broke off, or they were killed for holding an "
            "image past DINO_DECODE_TIMEOUT_S.",
            registry=registry,
        )
        self.rejected = Counter(
            "dino_rejected_images",
            "Images refused, by error code.",
            ("code",),
            registry=registry,
        )
        self.model_info = Gauge(
            "dino_model_info",
            "The model being served (value 1), with its version, weights digest and provider.",
            ("name", "version", "weights_sha256", "execution_provider"),
            registry=registry,
        )
        self.model_ready = Gauge(
            "dino_model_ready", "1 when a checked, warmed-up model serves.", registry=registry
        )
        self.model_loads = Counter(
            "dino_model_loads",
            "Model load attempts by outcome (loaded, failed).",
            ("outcome",),
            registry=registry,
        )

    def set_model(self, *, name: str, version: int, sha256: str, provider: str) -> None:
        """Replace the model-info series with the newly served model."""
        self.model_info.clear()
        self.model_info.labels(name, str(version), sha256, provider).set(1)
        self.model_ready.set(1)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
