"""Shared fixtures: a tiny seeded ViT and a model repository holding its ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.export import export_to_repository
from models.vit import VisionTransformer, ViTConfig

TINY_MODEL_NAME = "tiny"


def make_tiny_config() -> ViTConfig:
    """Patch 8, width 32, 2 blocks, 2 heads, trained at 32x32."""
    return ViTConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32, arch="custom")


def make_tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(make_tiny_config()).eval()


@pytest.fixture
def tiny_vit_config() -> ViTConfig:
    return make_tiny_config()


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()


@pytest.fixture(scope="session")
def tiny_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with ``tiny/1/model.onnx`` (resolution 32). Treat it as read-only."""
    repository = tmp_path_factory.mktemp("model_repository")
    export_to_repository(
        make_tiny_vit(),
        repository,
        TINY_MODEL_NAME,
        resolution=32,
        weights_sha256="0" * 64,
        source="tests: seeded tiny ViT",
    )
    return repository
