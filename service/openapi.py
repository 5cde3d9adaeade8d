"""OpenAPI documentation of ``POST /embed``, whose body the route parses itself.

The route reads the body with a size limit before parsing it, so FastAPI cannot infer the
request schema; it is declared here (multipart form or a raw image, plus query options).

``python -m service.openapi > tests/service/openapi.json`` writes the whole document (the
committed snapshot that ``tests/service/test_openapi.py`` compares with).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from service.schemas import ErrorResponse

_OPTION_SCHEMAS: dict[str, dict[str, Any]] = {
    "outputs": {
        "type": "array",
        "items": {"type": "string", "enum": ["cls", "patch", "attention"]},
        "description": "Outputs to return (repeat the field or separate with commas). "
        "Default: cls.",
    },
    "normalize": {
        "type": "boolean",
        "default": False,
        "description": "L2-normalise the CLS embedding.",
    },
    "resolution": {
        "type": "integer",
        "minimum": 1,
        "description": "Processed size (crop side, or shorter side with crop=none); rounded to "
        "a multiple of the patch size. Default: the model's resolution.",
    },
    "crop": {
        "type": "string",
        "enum": ["center", "none"],
        "default": "center",
        "description": "center: resize the shorter side then centre-crop (DINO evaluation). "
        "none: keep the whole image, aspect preserved, sides rounded to patch multiples.",
    },
    "encoding": {
        "type": "string",
        "enum": ["json", "base64"],
        "default": "json",
        "description": "json: nested float lists. base64: little-endian raw bytes with dtype "
        "and shape.",
    },
    "dtype": {
        "type": "string",
        "enum": ["float32", "float16"],
        "default": "float32",
        "description": "Precision of the returned arrays.",
    },
}

EMBED_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            **({"style": "form", "explode": True} if name == "outputs" else {}),
        }
        for name, schema in _OPTION_SCHEMAS.items()
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "PNG, JPEG (also MPO: first picture), WebP, BMP, "
                            "GIF (first frame) or TIFF files; repeat the field for several "
                            "images.",
                        },
                        **_OPTION_SCHEMAS,
                    },
                },
                "encoding": {"images": {"contentType": "image/*"}},
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}

_ERROR = {"model": ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Empty, corrupt or non-image file, or a malformed body."},
    401: {**_ERROR, "description": "Missing or wrong API key (when keys are configured)."},
    408: {**_ERROR, "description": "The body did not arrive within the read timeout."},
    413: {
        **_ERROR,
        "description": "Body too large, an image with too many pixels, an image whose "
        "attention matrix exceeds the per-call memory budget (too_many_tokens), or an answer "
        "over the response size limit (response_too_large).",
    },
    415: {**_ERROR, "description": "Unsupported Content-Type or image format."},
    422: {
        **_ERROR,
        "description": "Unknown option, invalid value, no or too many images, too many parts.",
    },
    429: {
        **_ERROR,
        "description": "Queue or body budget full; retry after the Retry-After seconds.",
    },
    500: {**_ERROR, "description": "Server fault (inference_failed, internal_error); logged."},
    503: {**_ERROR, "description": "No model loaded yet."},
}


def main() -> int:
    """Print the service's OpenAPI document (sorted keys, 2-space indent) to stdout."""
    from service.app import create_app  # deferred: the app module imports this one
    from service.settings import Settings

    document = create_app(Settings.model_construct()).openapi()
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
