"""Domain errors of the service, each with its HTTP status and a stable error code.

Every error answers ``{"error": {"code": ..., "message": ..., "index": ...}}``; ``index`` names
the offending image (0-based, in request order) when there is one, else it is null.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: a client-visible failure with an HTTP status and a code.

    Args:
        message: Human-readable explanation naming the bad value.
        index: Position of the offending image in the request, if any.
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


class InvalidOptionError(ServiceError):
    """An unknown option name or an invalid option value."""

    status = 422
    code = "invalid_option"


class NoImagesError(ServiceError):
    """The request carried no image."""

    status = 422
    code = "no_images"


class TooManyImagesError(ServiceError):
    """More images than ``max_images_per_request``."""

    status = 422
    code = "too_many_images"


class TooManyPartsError(ServiceError):
    """A multipart body with more parts than images plus options allow."""

    status = 422
    code = "too_many_parts"


class BodyTooLargeError(ServiceError):
    """The request body exceeds ``max_body_bytes``."""

    status = 413
    code = "body_too_large"

    def headers(self) -> dict[str, str]:
        """The connection is not reusable: the rest of the body was not read."""
        return {"Connection": "close"}


class ImageTooLargeError(ServiceError):
    """An image has more pixels than ``max_image_pixels`` (refused before decoding)."""

    status = 413
    code = "image_too_large"


class ResponseTooLargeError(ServiceError):
    """The answer would exceed ``max_response_bytes``."""

    status = 413
    code = "response_too_large"


class TooManyTokensError(ServiceError):
    """One image would need more attention memory than ``max_batch_attention_bytes``."""

    status = 413
    code = "too_many_tokens"


class RequestTimeoutError(ServiceError):
    """The body did not arrive within ``body_timeout_s``."""

    status = 408
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        """The connection is not reusable: part of the body may still be in transit."""
        return {"Connection": "close"}


class ClientDisconnectedError(ServiceError):
    """The client closed the connection before its body arrived or its answer was ready.

    Nobody reads this answer; the status (nginx's 499) shows in the request metrics and logs.
    """

    status = 499
    code = "client_closed_request"


class EmptyImageError(ServiceError):
    """A zero-byte image part."""

    status = 400
    code = "empty_image"


class NotAnImageError(ServiceError):
    """Bytes that no supported image decoder recognises."""

    status = 400
    code = "not_an_image"


class CorruptImageError(ServiceError):
    """A recognised image whose pixel data is truncated or corrupt."""

    status = 400
    code = "corrupt_image"


class ImageTooComplexError(ServiceError):
    """An image whose file structure would cost far more to decode than its pixels.

    Thousands of progressive JPEG scans, millions of empty segments or blocks, TIFF tiles far
    larger than the image (see :mod:`service.structure`); or, with decode processes, an image
    still decoding after ``DINO_DECODE_TIMEOUT_S`` (see :mod:`service.decode_pool`).
    """

    status = 422
    code = "image_too_complex"


class UnsupportedImageFormatError(ServiceError):
    """An image format outside the supported list (PNG, JPEG, MPO, WebP, BMP, GIF, TIFF)."""

    status = 415
    code = "unsupported_image_format"


class UnsupportedMediaTypeError(ServiceError):
    """A request ``Content-Type`` other than multipart/form-data or image/*."""

    status = 415
    code = "unsupported_media_type"


class UnsupportedContentEncodingError(UnsupportedMediaTypeError):
    """A compressed request body (``Content-Encoding`` other than ``identity``)."""

    def headers(self) -> dict[str, str]:
        """The codings the service takes (RFC 9110, 15.5.16): none but ``identity``."""
        return {"Accept-Encoding": "identity"}


class MalformedRequestError(ServiceError):
    """A body that cannot be parsed (for example broken multipart framing)."""

    status = 400
    code = "malformed_request"


class UnauthorizedError(ServiceError):
    """Missing or wrong API key."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        """Ask for a bearer token."""
        return {"WWW-Authenticate": "Bearer"}


class OverloadedError(ServiceError):
    """The bounded queue (or the in-flight body budget) is full; retry later.

    Args:
        message: Explanation.
        retry_after_s: Seconds the client should wait.
        body_unread: Refused while the body was being read: the connection is then closed
            after the answer, or the client would go on sending the rest of it.
    """

    status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int, body_unread: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.body_unread = body_unread

    def headers(self) -> dict[str, str]:
        """Tell the client when to retry (and close a connection whose body was cut off)."""
        headers = {"Retry-After": str(self.retry_after_s)}
        if self.body_unread:
            headers["Connection"] = "close"
        return headers


class NotReadyError(ServiceError):
    """No model is loaded (yet)."""

    status = 503
    code = "not_ready"


class InferenceFailedError(ServiceError):
    """The inference engine failed on an image (a server fault, not the client's).

    The message carries a reference to the log line, never the engine's own text.
    """

    status = 500
    code = "inference_failed"
