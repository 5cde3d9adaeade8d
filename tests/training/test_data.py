"""Image sources and the multi-crop augmentation."""

from __future__ import annotations

import errno
import gzip
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.data as data_module
from tests.training.conftest import write_fashion_mnist
from training.augment import DataAugmentationDINO
from training.data import (
    UNREADABLE_ERRORS,
    DataError,
    ImageFolderDataset,
    ImageTooLargeError,
    build_dataset,
    canvas_transform,
    collate_crops,
    find_images,
    load_rgb,
    read_fashion_mnist,
)
from training.data import _reason as reason_of


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
    assert {path.rsplit("/", 1)[-1] for path, _ in skipped} == {"c.jpg", "d.png"}
    assert all(reason for _, reason in skipped)  # the warning says why


def test_skip_reasons_say_what_is_wrong_with_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    reasons = {}
    for path in sorted(tmp_path.iterdir()):
        try:
            load_rgb(path)
        except UNREADABLE_ERRORS as err:
            reasons[path.name] = reason_of(err)
    assert reasons == {
        "empty.png": "ValueError: empty file (0 bytes)",
        "text.jpg": "UnidentifiedImageError: not an image, or in a format Pillow cannot read",
    }  # not "cannot identify image file <_io.BufferedReader name=3>"


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
    batch, bad = collate_crops([(crops, ()), (aug(image), (("x.jpg", "OSError: truncated"),))])
    assert [tuple(b.shape) for b in batch] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    assert bad == [("x.jpg", "OSError: truncated")]
    # A constant mid-grey image stays finite and ImageNet-normalised.
    grey = aug(Image.new("RGB", (40, 40), (124, 116, 104)))[0]
    assert grey.abs().max() < 3


def test_folder_scan_visits_each_real_folder_once_and_only_regular_files(tmp_path, caplog):
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(root / "b.png")
    (root / "loop").symlink_to(root)  # a loop: followed once, not 40 levels deep
    (root / "cats" / "again").symlink_to(root / "cats")
    (root / "alias").symlink_to(root / "cats")  # a second name for one folder
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "c.png")  # hidden folder
    Image.new("RGB", (8, 8)).save(root / ".d.png")  # hidden file
    os.mkfifo(root / "pipe.png")  # would block open() forever
    (root / "dangling.png").symlink_to(root / "missing.png")
    found = [path.relative_to(root).as_posix() for path in find_images(root)]
    assert len(found) == 2 and "b.png" in found
    assert sum(name.endswith("a.png") for name in found) == 1
    with pytest.raises(ValueError, match="not a regular file"):  # and no wait for a writer
        load_rgb(root / "pipe.png")


def test_a_long_scan_logs_its_progress_and_a_short_one_is_quiet(tmp_path, caplog):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "x.png")
    with caplog.at_level(logging.INFO, logger="training.data"):
        assert len(find_images(root)) == 3  # the default interval (10 s): no line
        assert caplog.records == []
        assert len(find_images(root, report_every_s=0.0)) == 3  # a report at every folder
    lines = [r.getMessage() for r in caplog.records]
    # four folders (the root and a, b, c), each reported before it is read, then the total
    assert len(lines) == 5 and all(str(root) in line for line in lines)
    assert lines[0].startswith(f"scanning {root}: 0 images in 0 folders so far")
    assert lines[3].startswith(f"scanning {root}: 2 images in 3 folders so far")
    assert lines[-1].startswith(f"scanned {root}: 3 images in 4 folders (")


def test_a_flat_folder_of_many_files_reports_while_it_is_listed(tmp_path, monkeypatch, caplog):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(5000):
        (root / f"{i:05d}.jpg").touch()
    clock = iter(range(0, 1000, 7))  # each reading 7 s later than the one before
    monkeypatch.setattr(data_module.time, "monotonic", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="training.data"):
        assert len(find_images(root)) == 5000
    lines = [r.getMessage() for r in caplog.records]
    # readings: 0 (start), 7 (before the folder: under 10 s), 14 (after 4096 entries), end
    assert lines[0] == f"scanning {root}: 4095 images in 1 folders so far (14 s)"
    assert lines[-1] == f"scanned {root}: 5000 images in 1 folders (21 s)"
    assert len(lines) == 2


def test_folders_that_cannot_be_read_are_named(tmp_path, monkeypatch, caplog):
    root = tmp_path / "data"
    (root / "locked").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "b.png")
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, who runs CI
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(data_module.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        assert [p.name for p in find_images(root)] == ["b.png"]
    assert any("locked" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # mode I;16
    rgb = np.asarray(load_rgb(tmp_path / "ramp.png"))
    expected = (ramp.astype(np.uint32) * 255 + 32767) // 65535  # round(v * 255 / 65535)
    assert rgb.shape == (16, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert len(np.unique(rgb)) > 200  # convert("RGB") alone leaves 2 levels, mostly white


def test_images_over_the_pixel_limit_are_refused_from_the_header(tmp_path):
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    with pytest.raises(ImageTooLargeError, match="300x200 = 60000 pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=50_000)
    dataset = ImageFolderDataset(tmp_path, lambda im: im.size, max_image_pixels=50_000)
    size, bad = dataset[0]  # big.png sorts first: passed over, with the reason
    assert size == (10, 10)
    assert [(Path(path).name, reason.split(":")[0]) for path, reason in bad] == [
        ("big.png", "ImageTooLargeError")
    ]
    assert load_rgb(tmp_path / "big.png", max_pixels=0).size == (300, 200)


def test_a_run_of_bad_files_is_tried_once_per_file(tmp_path, monkeypatch):
    for i in range(30):
        (tmp_path / f"bad{i:02}.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "z.png")
    attempts = []
    real = data_module.load_rgb

    def counting(path, *args):
        attempts.append(path)
        return real(path, *args)

    monkeypatch.setattr(data_module, "load_rgb", counting)
    dataset = ImageFolderDataset(tmp_path, lambda im: im.size)
    reported = []
    for index in range(len(dataset)):
        size, bad = dataset[index]
        assert size == (8, 8)
        reported += [path for path, _ in bad]
    assert len(attempts) == 30 + 31  # each bad file once, the good one per item
    assert sorted(Path(p).name for p in reported) == [f"bad{i:02}.jpg" for i in range(30)]


def test_a_transient_io_error_is_not_remembered(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    real = data_module.load_rgb
    failures = {"a.png": 1}

    def flaky(path, *args):
        if failures.get(path.name):
            failures[path.name] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args)

    monkeypatch.setattr(data_module, "load_rgb", flaky)
    dataset = ImageFolderDataset(tmp_path, lambda im: im.size)
    size, bad = dataset[0]
    assert size == (4, 4) and [Path(p).name for p, _ in bad] == ["a.png"]
    assert dataset[0] == ((8, 8), ())  # tried again: it reads now
    # An I/O error that stays is given up on after three tries, not retried by every item.
    failures["a.png"] = 1000
    for _ in range(10):
        dataset[0]
    assert failures["a.png"] == 1000 - 2  # three failures in all, with the first one above


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "cannot read Fashion-MNIST file"),
        ("not_idx", "not a Fashion-MNIST IDX file"),
        ("short", "cut short or padded"),
        ("empty", "not a Fashion-MNIST IDX file"),
    ],
)
def test_damaged_fashion_mnist_files_are_one_line_errors(tmp_path, damage, message):
    root = write_fashion_mnist(tmp_path / "fm", n_train=12, n_test=5)
    path = root / "t10k-images-idx3-ubyte.gz"
    packed = path.read_bytes()
    raw = gzip.decompress(packed)
    if damage == "truncated":  # an interrupted download
        path.write_bytes(packed[: len(packed) // 2])
    elif damage == "not_idx":
        path.write_bytes(gzip.compress(b"<html>" + raw[6:]))
    elif damage == "short":
        path.write_bytes(gzip.compress(raw[:-100]))
    else:
        path.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=message):
        read_fashion_mnist("test", root)


def test_canvases_of_thin_images_stay_small():
    torch.manual_seed(0)
    strip = Image.new("RGB", (20_000, 2))  # resized whole, 2.2 million x 224
    canvas = canvas_transform(224)(strip)
    assert tuple(canvas.shape) == (3, 224, 224)
    tall = canvas_transform(32)(Image.new("RGB", (3, 900)))
    assert tuple(tall.shape) == (3, 32, 32)


def test_a_folder_without_one_readable_image_says_why(tmp_path, monkeypatch):
    """The error counts the files per reason and names one of each, with its reason."""
    for i in range(3):
        (tmp_path / f"text{i}.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "locked.png")
    real = data_module.load_rgb

    def locked(path, *args):  # chmod 000 does not stop root: the error it gives others
        if path.name == "locked.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(data_module, "load_rgb", locked)
    dataset = ImageFolderDataset(tmp_path, lambda im: im.size)
    with pytest.raises(DataError) as first:
        dataset[0]
    with pytest.raises(DataError) as again:  # the files are remembered as bad: still named
        dataset[3]
    message = str(first.value)
    assert str(again.value) == message and "\n" not in message
    assert message == (
        f"none of the 5 images under {tmp_path} is readable: 3 not an image (e.g. "
        f"{tmp_path / 'text0.jpg'}: UnidentifiedImageError: not an image, or in a format Pillow "
        f"cannot read), 1 empty file (0 bytes) (e.g. {tmp_path / 'empty.png'}), 1 permission "
        f"denied (e.g. {tmp_path / 'locked.png'})"
    )
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    short = tmp_path / "short.png"
    Image.new("RGB", (30, 30), (0, 9, 0)).save(short)
    short.write_bytes(short.read_bytes()[:60])
    with pytest.raises(DataError) as info:
        ImageFolderDataset(tmp_path, lambda im: im.size, max_image_pixels=1000)[0]
    message = str(info.value)
    assert f"1 too many pixels (e.g. {tmp_path / 'big.png'}: ImageTooLargeError: 300x200" in message
    assert message.endswith(", 2 for other reasons")  # three kinds named at most
