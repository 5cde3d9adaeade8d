"""Response encoding: float16 range, base64 layout."""

from __future__ import annotations

import base64
import json

import numpy as np

from service.encode import FLOAT16_MAX, ImageRecord, encode_array, encode_response
from service.options import EmbedOptions


def test_float16_clips_instead_of_overflowing() -> None:
    value = np.array([1e6, -3e38, 1.5, 70000.0], dtype=np.float32)
    assert encode_array(value, encoding="json", dtype="float16") == [
        FLOAT16_MAX,
        -FLOAT16_MAX,
        1.5,
        FLOAT16_MAX,
    ]
    packed = encode_array(value, encoding="base64", dtype="float16")
    decoded = np.frombuffer(base64.b64decode(packed["data"]), dtype="<f2")
    assert np.isfinite(decoded).all()
    np.testing.assert_array_equal(decoded, [65504, -65504, 1.5, 65504])


def test_float32_keeps_large_values() -> None:
    value = np.array([1e6, -3e38], dtype=np.float32)
    assert encode_array(value, encoding="json", dtype="float32") == [1e6, float(value[1])]


def test_a_response_with_huge_values_encodes_as_float16() -> None:
    record = ImageRecord(
        index=0,
        original_size=(8, 8),
        processed_size=(8, 8),
        grid=(1, 1),
        outputs={"cls_embedding": np.full(4, 1e9, dtype=np.float32)},
    )
    body = encode_response(
        model={"name": "m"},
        options=EmbedOptions(dtype="float16"),
        resolution=8,
        records=[record],
    )
    assert json.loads(body)["results"][0]["cls_embedding"] == [FLOAT16_MAX] * 4
