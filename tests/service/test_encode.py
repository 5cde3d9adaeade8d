"""Response encoding: float16 range, base64 layout."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

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


def test_non_finite_values_are_refused_not_written_as_null() -> None:
    """orjson writes NaN and infinities as null: the encoder refuses them in every encoding."""
    for bad in (np.nan, np.inf):
        record = ImageRecord(
            index=3,
            original_size=(8, 8),
            processed_size=(8, 8),
            grid=(1, 1),
            outputs={"cls_embedding": np.array([1.0, bad], dtype=np.float32)},
        )
        for encoding in ("json", "base64"):
            with pytest.raises(ValueError, match="cls_embedding of image 3 holds NaN or infinity"):
                encode_response(
                    model={"name": "m"},
                    options=EmbedOptions(encoding=encoding),
                    resolution=8,
                    records=[record],
                )


def test_json_floats_read_back_bit_identical() -> None:
    """The compact encoder writes each float32 value so that it parses back exactly."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    record = ImageRecord(
        index=0,
        original_size=(8, 8),
        processed_size=(8, 8),
        grid=(1, 1),
        outputs={"cls_embedding": values},
    )
    body = encode_response(
        model={"name": "m"}, options=EmbedOptions(), resolution=8, records=[record]
    )
    parsed = np.array(json.loads(body)["results"][0]["cls_embedding"], dtype=np.float32)
    np.testing.assert_array_equal(parsed.view(np.uint32), values.view(np.uint32))
