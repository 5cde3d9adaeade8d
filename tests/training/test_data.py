"""Image sources and the multi-crop augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.conftest import write_fashion_mnist
from training.augment import DataAugmentationDINO
from training.data import (
    DataError,
    ImageFolderDataset,
    build_dataset,
    collate_crops,
    find_images,
    read_fashion_mnist,
)


def test_folder_is_recursive_and_skips_unreadable_files(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    Image.new("L", (8, 8), 7).save(tmp_path / "deep" / "er" / "b.JPG")
    (tmp_path / "c.jpg").write_bytes(b"garbage")
    full = tmp_path / "d.png"
    Image.new("RGB", (64, 64), (0, 9, 0)).save(full)
    full.write_bytes(full.read_bytes()[:60])  # truncated
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, lambda im: np.asarray(im))
    assert len(dataset) == 4 and len(find_images(tmp_path)) == 4
    seen, skipped = [], set()
    for i in range(len(dataset)):
        image, bad = dataset[i]
        assert image.ndim == 3 and image.shape[2] == 3  # grayscale became RGB
        seen.append(image.shape)
        skipped.update(bad)
    assert {p.rsplit("/", 1)[-1] for p in skipped} == {"c.jpg", "d.png"}


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), lambda im: im)
    with pytest.raises(DataError, match="no images"):
        build_dataset(str(tmp_path), lambda im: im)


def test_fashion_mnist_reader(tmp_path, monkeypatch):
    root = write_fashion_mnist(tmp_path / "fm", n_train=12, n_test=5)
    images, labels = read_fashion_mnist("test", root)
    assert images.shape == (5, 28, 28) and labels.shape == (5,)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    dataset = build_dataset("fashion-mnist:train", lambda im: im)
    image, bad = dataset[0]
    assert image.mode == "RGB" and image.size == (28, 28) and bad == ()
    with pytest.raises(DataError, match="split"):
        build_dataset("fashion-mnist:val", lambda im: im)


def test_multicrop_shapes_order_and_collation():
    torch.manual_seed(0)
    aug = DataAugmentationDINO(local_crops_number=3, global_size=32, local_size=16)
    image = Image.fromarray((np.random.default_rng(0).random((50, 40, 3)) * 255).astype(np.uint8))
    crops = aug(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    batch, bad = collate_crops([(crops, ()), (aug(image), ("x.jpg",))])
    assert [tuple(b.shape) for b in batch] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    assert bad == ["x.jpg"]
    # A constant mid-grey image stays finite and ImageNet-normalised.
    grey = aug(Image.new("RGB", (40, 40), (124, 116, 104)))[0]
    assert grey.abs().max() < 3
