"""Fixtures for the training tests: generated images and tiny run options."""

from __future__ import annotations

import gzip
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """Random-content RGB images of varied sizes in an ImageFolder layout (2 classes)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / ("cats" if i % 2 else "dogs") / ("sub" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images", 18)


def default_signals() -> None:
    """SIGINT and SIGTERM at their defaults (a ``preexec_fn`` for a child that must react to
    them as in a terminal, also when the test runner was started ignoring them)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data_path", str(data), "--output_dir", str(out), "--device", "cpu",
        "--arch", "vit_tiny", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
        "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--out_dim", "64", "--head_hidden_dim", "48",
        "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "4", "--epochs", "2",
        "--warmup_epochs", "1", "--num_workers", "0", "--log_every", "1", "--progress", "false",
        "--saveckp_freq", "1", "--lr", "0.05",
        *extra,
    ]  # fmt: skip


def write_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Fashion-MNIST-format gz IDX files with class-dependent synthetic images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for n, prefix in ((n_train, "train"), (n_test, "t10k")):
        labels = rng.integers(0, 3, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            images[i, :, :] = rng.integers(0, 40, (28, 28))
            images[i, label * 9 : label * 9 + 9, :] = 220  # a class-specific bright band
        header = [0x803, n, 28, 28]  # IDX: magic (unsigned byte, 3 dims), then the sizes
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"".join(v.to_bytes(4, "big") for v in header) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"".join(v.to_bytes(4, "big") for v in (0x801, n)) + labels.tobytes())
    return root
