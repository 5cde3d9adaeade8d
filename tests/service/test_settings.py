"""Settings from DINO_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DINO_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.model_repository == Path("model_repository")
    assert settings.model_name == "dino_default"
    assert settings.device == "auto" and settings.api_keys == ()
    assert settings.version_policy == "latest"


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINO_API_KEYS", " k1 ,k2,, ")
    monkeypatch.setenv("DINO_WARMUP_BATCH_SIZES", "1,8")
    monkeypatch.setenv("DINO_DEVICE", "cpu")
    monkeypatch.setenv("DINO_MAX_BATCH_SIZE", "7")
    settings = Settings()
    assert settings.api_keys == ("k1", "k2")
    assert settings.warmup_batch_sizes == (1, 8)
    assert settings.device == "cpu" and settings.max_batch_size == 7


@pytest.mark.parametrize(
    "env",
    [
        {"DINO_DEVICE": "tpu"},
        {"DINO_VERSION_POLICY": "pinned"},
        {"DINO_MODEL_NAME": "../etc"},
        {"DINO_MAX_IMAGES_PER_REQUEST": "300", "DINO_MAX_QUEUE_IMAGES": "10"},
        {"DINO_WARMUP_BATCH_SIZES": "0"},
    ],
)
def test_invalid_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.delenv("DINO_MODEL_VERSION", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()
