"""The batched device-side multi-crop against torchvision / PIL oracles and the CPU path."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from tests.training.conftest import tiny_args, write_fashion_mnist
from training.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataAugmentationDINO,
    MultiCropGeometry,
)
from training.checkpoint import load_checkpoint
from training.data import DataError, canvas_transform, collate_canvases
from training.gpu_augment import (
    BatchedMultiCrop,
    ColorJitterRecipe,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_color_jitter,
    blur_radius,
    box_blur_kernels,
    luma,
    sample_crop_boxes,
    separable_blur,
    solarize,
)
from training.pretrain import main

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
NO_COLOR = ColorJitterRecipe(jitter_p=0.0, grayscale_p=0.0)


def plain(size: int, local_size: int = 8, **kw: object) -> BatchedMultiCrop:
    """Full-image square crops with every random operation disabled unless overridden."""
    options: dict[str, object] = {
        "ratio": (1.0, 1.0),
        "flip_p": 0.0,
        "color": NO_COLOR,
        "blur_p": (0.0, 0.0, 0.0),
        "solarize_p": 0.0,
    }
    options.update(kw)
    return BatchedMultiCrop((1.0, 1.0), (1.0, 1.0), 1, size, local_size, **options)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def colour_canvases(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Smooth colourful uint8 canvases: gradients plus a coloured rectangle per image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        base = np.stack([x, y, 1 - x * y]) * rng.uniform(60, 200, (3, 1, 1))
        top, left = rng.integers(0, size // 2, 2)
        base[:, top : top + size // 3, left : left + size // 3] = rng.uniform(0, 255, (3, 1, 1))
        out[i] = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def denorm(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_shapes_dtypes_order_and_determinism():
    aug = BatchedMultiCrop((0.4, 1.0), (0.1, 0.4), 3, 32, 16)
    images = colour_canvases(5)
    crops = aug(images, gen(1))
    assert aug.ncrops == 5 and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    again = aug(images, gen(1))
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))
    other = aug(images, gen(2))
    assert not any(torch.equal(a, b) for a, b in zip(crops, other, strict=True))
    # Samples and crops are augmented independently.
    assert not torch.equal(crops[2][0], crops[3][0])
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float(), gen())
    assert len(BatchedMultiCrop(local_crops_number=0, global_size=16)(images, gen())) == 2


def test_crop_order_solarises_global_2_only():
    white = torch.full((4, 3, 20, 20), 255, dtype=torch.uint8)
    aug = BatchedMultiCrop(
        (0.4, 1.0), (0.1, 0.4), 2, 16, 8,
        color=NO_COLOR, blur_p=(0.0, 0.0, 0.0), solarize_p=1.0,
    )  # fmt: skip
    crops = [denorm(c) for c in aug(white, gen())]
    assert torch.allclose(crops[0], torch.ones_like(crops[0]), atol=1e-5)
    assert torch.allclose(crops[1], torch.zeros_like(crops[1]), atol=1e-5)
    assert all(torch.allclose(c, torch.ones_like(c), atol=1e-5) for c in crops[2:])


def test_full_crop_is_bicubic_resize_and_flip_flips():
    images = colour_canvases(3)
    x = images.float() / 255
    resized = F.interpolate(x, size=32, mode="bicubic", align_corners=False).clamp(0, 1)
    out = denorm(plain(32)(images, gen())[0])
    assert (out - resized).abs().max() < 1e-5
    flipped = denorm(plain(32, flip_p=1.0)(images, gen())[0])
    assert (flipped - resized.flip(-1)).abs().max() < 1e-5
    # Close to the CPU path's PIL resize (cubic a=-0.5 vs -0.75): within 2 grey levels on average.
    pil = torch.stack(
        [
            TF.to_dtype(
                TF.pil_to_tensor(TF.to_pil_image(img).resize((32, 32), Image.Resampling.BICUBIC)),
                torch.float32,
                scale=True,
            )
            for img in images
        ]
    )
    assert (out - pil).abs().mean() < 2 / 255


def test_crop_boxes_respect_bounds_and_match_torchvision():
    height, width, n = 30, 40, 3000
    scale, ratio = (0.05, 0.4), (3 / 4, 4 / 3)
    top, left, h, w = sample_crop_boxes(n, height, width, scale, ratio, gen()).unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert torch.equal(h, h.round()) and torch.equal(w, w.round())
    area = height * width
    # Some real (w*, h*) within rounding distance satisfies the scale and ratio bounds.
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()

    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)],
        dtype=torch.float32,
    )

    def stats(
        t: torch.Tensor, lft: torch.Tensor, hh: torch.Tensor, ww: torch.Tensor
    ) -> torch.Tensor:
        return torch.stack(
            [hh * ww / area, torch.log(ww / hh), t + hh / 2, lft + ww / 2, hh, ww], dim=1
        )

    mine = stats(top, left, h, w)
    theirs = stats(*ref.unbind(1))
    stderr = torch.sqrt(mine.var(0) / n + theirs.var(0) / n)
    assert ((mine.mean(0) - theirs.mean(0)).abs() < 4 * stderr).all()
    assert ((mine.std(0) / theirs.std(0)) - 1).abs().max() < 0.1

    # Every try fails on a 10x100 canvas with scale (0.9, 1): torchvision's centred fallback.
    fallback = sample_crop_boxes(8, 10, 100, (0.9, 1.0), ratio, gen())
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, 10, 100), [0.9, 1.0], list(ratio))
    assert fallback.tolist() == [list(map(float, expected))] * 8


def test_each_view_crops_with_its_scale():
    # A canvas whose red and green channels encode x and y: each crop reveals its box.
    side, n = 64, 200
    ramp = torch.arange(side, dtype=torch.uint8) * 4
    canvases = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    canvases[:, 0] = ramp.view(1, side)
    canvases[:, 1] = ramp.view(side, 1)
    aug = BatchedMultiCrop(
        (0.4, 1.0), (0.05, 0.3), 2, 24, 12,
        flip_p=0.5, color=NO_COLOR, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0,
    )  # fmt: skip
    crops = aug(canvases, gen())
    for views, (low, high) in ((crops[:2], (0.4, 1.0)), (crops[2:], (0.05, 0.3))):
        out = denorm(torch.cat(views)) * 255 / 4  # canvas pixel coordinates
        size = out.shape[-1]
        w = (out[:, 0, :, -1] - out[:, 0, :, 0]).abs().mean(1) * size / (size - 1)
        h = (out[:, 1, -1, :] - out[:, 1, 0, :]).mean(1) * size / (size - 1)
        area = w * h / side**2
        assert (area > low - 0.05).all() and (area < high + 0.05).all()
        assert abs(area.mean().item() - (low + high) / 2) < 0.05
        assert (w / h > 0.7).all() and (w / h < 1.4).all()


def test_color_operations_match_torchvision():
    x = torch.rand(6, 3, 12, 14, generator=gen())
    x[0, :, :3] = 0.5  # gray pixels (zero chroma)
    x[1, :, 4:] = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)  # saturated magenta
    factor = torch.tensor([0.6, 1.4, 1.0, 0.8, 1.2, 0.95])
    shift = torch.tensor([0.1, -0.1, 0.0, 0.05, -0.03, 0.5])
    for mine, ref, arg in (
        (adjust_brightness, TF.adjust_brightness, factor),
        (adjust_contrast, TF.adjust_contrast, factor),
        (adjust_saturation, TF.adjust_saturation, factor),
        (adjust_hue, TF.adjust_hue, shift),
    ):
        expected = torch.stack([ref(x[i], float(arg[i])) for i in range(6)])
        assert (mine(x.clone(), arg) - expected).abs().max() < 1e-5, mine.__name__
    assert (luma(x) - TF.rgb_to_grayscale(x)).abs().max() < 1e-6

    # Each image in its own order equals torchvision's operations applied in that order.
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    order = torch.stack([torch.randperm(4, generator=gen(i)) for i in range(6)])
    order[0] = torch.tensor([3, 0, 1, 2])  # hue first and last are covered
    order[1] = torch.tensor([2, 1, 0, 3])
    factors = torch.stack([factor, factor.flip(0), 2 - factor, shift], dim=1)
    expected = []
    for i in range(6):
        y = x[i]
        for op in order[i].tolist():
            y = ops[op](y, float(factors[i, op]))
        expected.append(y)
    out = apply_color_jitter(x.clone(), factors, order)
    assert (out - torch.stack(expected)).abs().max() < 1e-5
    identity = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 6)
    assert (apply_color_jitter(x.clone(), identity, order) - x).abs().max() < 1e-5


def test_grayscale_is_exact_luma_and_solarize_threshold_is_exact():
    images = colour_canvases(4)
    aug = plain(28, color=ColorJitterRecipe(jitter_p=0.0, grayscale_p=1.0))
    out = denorm(aug(images, gen())[0])  # same-size full crop: the identity resampling
    x = images.float() / 255
    expected = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for channel in range(3):
        assert (out[:, channel] - expected).abs().max() < 1e-5

    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 255
    levels = levels.expand(2, 3, 16, 16)
    solarised = solarize(levels, torch.tensor([True, False]))
    values = torch.round(solarised[0, 0].flatten() * 255).int().tolist()
    assert values == list(range(128)) + [255 - v for v in range(128, 256)]
    assert torch.equal(solarised[1], levels[1])


SIGMAS = [0.1, 0.2, 0.3, 0.45, 0.7, 1.3, 2.0]


def test_blur_kernels_have_pil_variance_at_every_sigma():
    """Three box passes of variance sigma^2/3 each: sigma^2 in all, small sigma included."""
    radius = blur_radius(2.0)
    assert radius == 2  # PIL's box for sigma 2 spans 5 taps (l = 1 plus the fractional ends)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    kernels = box_blur_kernels(sigma, radius)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    torch.testing.assert_close(kernels.sum(1), torch.ones(len(SIGMAS), dtype=torch.float64))
    torch.testing.assert_close(3 * (kernels * t**2).sum(1), sigma**2)
    assert torch.equal(kernels, kernels.flip(1)) and (kernels >= 0).all()
    # A constant image stays constant (replicate padding, as PIL repeats the edge pixels).
    flat = torch.full((1, 3, 8, 8), 0.3)
    out = separable_blur(flat, box_blur_kernels(torch.tensor([2.0]), radius), passes=3)
    torch.testing.assert_close(out, flat)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_matches_pil_gaussian_blur(sigma):
    """Against PIL's GaussianBlur itself (what the CPU path and the reference run)."""
    rng = np.random.default_rng(int(sigma * 10))
    pixels = rng.integers(0, 256, (30, 34, 3)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(sigma)))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    kernels = box_blur_kernels(torch.tensor([sigma]), blur_radius(2.0))
    ours = separable_blur(x, kernels, passes=3)[0].permute(1, 2, 0).numpy() * 255
    diff = np.abs(ours - ref.astype(np.float32))
    # PIL rounds to 8 bits (in fixed point) after each of its six passes: a few levels at most.
    assert diff.max() < 3.5 and diff.mean() < 1.5, (diff.max(), diff.mean())
    # Spread of a thin line: what a sampled Gaussian gets wrong below sigma ~ 0.5.
    line = np.zeros((1, 41), np.uint8)
    line[0, 20] = 255
    pil_line = np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(sigma)))
    ours_line = separable_blur(
        torch.from_numpy(line).float()[None, None].expand(1, 3, 1, 41).contiguous(), kernels, 3
    )[0, 0, 0].numpy()
    t = np.arange(41) - 20
    spread = math.sqrt((ours_line * t**2).sum() / ours_line.sum())
    assert abs(spread - sigma) < 1e-4
    pil_spread = math.sqrt((pil_line[0] * t**2).sum() / pil_line[0].sum())
    if sigma >= 0.2:  # below, PIL's 8-bit output rounds the spread away entirely
        assert abs(spread - pil_spread) < 0.02, pil_spread


def test_flip_and_grayscale_rates():
    n = 600
    canvases = torch.zeros(n, 3, 16, 16, dtype=torch.uint8)
    canvases[:, 0, :, 8:] = 250  # red on the right only
    aug = plain(16, flip_p=0.5, color=ColorJitterRecipe(jitter_p=0.0, grayscale_p=0.2))
    out = denorm(aug(canvases, gen())[0])
    flipped = out[:, :, :, :8].mean((1, 2, 3)) > out[:, :, :, 8:].mean((1, 2, 3))
    gray = (out[:, 0] - out[:, 1]).abs().flatten(1).amax(1) < 1e-4
    assert abs(flipped.float().mean().item() - 0.5) < 0.07
    assert abs(gray.float().mean().item() - 0.2) < 0.05


@pytest.mark.parametrize("path", ["whole images", "loader crops"])
def test_statistics_match_the_cpu_path(path):
    # 1200 images: over reseeds, the std ratios then stay within about 0.04 of 1 (at 300 they
    # reached 0.064, over the 0.06 bound) and the rates within 0.04 of each other.
    n = 1200
    canvases = colour_canvases(n, seed=3)
    torch.manual_seed(0)
    random.seed(0)  # the blur and solarisation coins of the CPU path (Python's, as the reference)
    cpu = DataAugmentationDINO((0.4, 1.0), (0.1, 0.4), 2, 32, 16)
    ref = [cpu(TF.to_pil_image(img)) for img in canvases]
    batched = BatchedMultiCrop((0.4, 1.0), (0.1, 0.4), 2, 32, 16)
    if path == "whole images":
        gpu = batched(canvases, gen())
    else:
        geometry = MultiCropGeometry((0.4, 1.0), (0.1, 0.4), 2, 32, 16)
        cut = [geometry(TF.to_pil_image(img)) for img in canvases]
        gpu = batched.photometric([torch.stack([c[v] for c in cut]) for v in range(4)], gen())
    groups = {"global 1": [0], "global 2": [1], "locals": [2, 3]}
    for name, views in groups.items():
        a = torch.cat([torch.stack([r[v] for r in ref]) for v in views])
        b = torch.cat([gpu[v] for v in views])
        per_image = a.flatten(1).mean(1)
        tolerance = 4 * math.sqrt(2) * per_image.std().item() / math.sqrt(len(a))
        assert abs(a.mean().item() - b.mean().item()) < tolerance, name
        assert abs(b.std().item() / a.std().item() - 1) < 0.06, name
        grad_a = (a[..., 1:] - a[..., :-1]).abs().mean().item()
        grad_b = (b[..., 1:] - b[..., :-1]).abs().mean().item()
        assert abs(grad_b / grad_a - 1) < 0.2, name  # similar sharpness (blur, resampling)
        gray_a = (a[:, 0] * STD[0, 0] - a[:, 1] * STD[0, 1] + MEAN[0, 0] - MEAN[0, 1]).abs()
        gray_b = (b[:, 0] * STD[0, 0] - b[:, 1] * STD[0, 1] + MEAN[0, 0] - MEAN[0, 1]).abs()
        # Two rates of p = 0.2 events (grayscale; solarisation on global 2) over len(a) draws
        # each: 4 standard deviations of their difference.
        rate_tolerance = 4 * math.sqrt(2 * 0.2 * 0.8 / len(a))
        rate_a = (gray_a.flatten(1).amax(1) < 1e-2).float().mean().item()
        rate_b = (gray_b.flatten(1).amax(1) < 1e-2).float().mean().item()
        assert abs(rate_a - rate_b) < rate_tolerance, name
        # Solarised images have no value above 128/255 (most canvases have brighter pixels).
        dark_a = (denorm(a).flatten(1).amax(1) < 0.51).float().mean().item()
        dark_b = (denorm(b).flatten(1).amax(1) < 0.51).float().mean().item()
        assert abs(dark_a - dark_b) < rate_tolerance, name


def test_canvas_transform_and_collation():
    image = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    canvas = canvas_transform(37)(image)
    assert canvas.dtype == torch.uint8 and tuple(canvas.shape) == (3, 37, 37)
    assert tuple(canvas_transform(None)(image).shape) == (3, 40, 60)
    batch, bad = collate_canvases([(canvas, ()), (canvas, (("x.jpg", "OSError"),))])
    assert tuple(batch.shape) == (2, 3, 37, 37) and bad == [("x.jpg", "OSError")]
    with pytest.raises(DataError, match="canvas_size"):
        collate_canvases([(canvas, ()), (canvas[:, :30], ())])


def test_pretrain_with_gpu_augmentation_resumes_exactly(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="training")
    root = write_fashion_mnist(tmp_path / "fm", n_train=16, n_test=4)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    data = "fashion-mnist:train"
    full, split = tmp_path / "full", tmp_path / "split"
    gpu = ("--augment_device", "gpu")
    assert main(tiny_args(data, full, *gpu)) == 0
    assert "(gpu augmentation)" in caplog.text
    assert main(tiny_args(data, split, *gpu, "--max_epochs_this_run", "1")) == 0
    assert main(tiny_args(data, split, *gpu)) == 0
    a = load_checkpoint(full / "checkpoint.pth")
    b = load_checkpoint(split / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["args"]["augment_device"] == "gpu"
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs after resume"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def test_photometric_keeps_the_loader_crops_and_checks_them():
    geometry = MultiCropGeometry((0.2, 1.0), (0.05, 0.4), 2, 24, 12)
    image = TF.to_pil_image(colour_canvases(1, size=40)[0])
    cut = geometry(image)
    assert [tuple(c.shape) for c in cut] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
    assert all(c.dtype == torch.uint8 and c.is_contiguous() for c in cut)
    crops = [c[None].repeat(3, 1, 1, 1) for c in cut]  # batch of 3
    aug = BatchedMultiCrop((0.2, 1.0), (0.05, 0.4), 2, 24, 12, color=NO_COLOR, blur_p=(0, 0, 0))
    aug.solarize_p = 0.0
    out = aug.photometric(crops, gen())
    for got, crop in zip(out, crops, strict=True):  # nothing random left: normalisation only
        torch.testing.assert_close(denorm(got), crop.float() / 255, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expected 4 crops"):
        aug.photometric(crops[:3], gen())
    with pytest.raises(ValueError, match="uint8"):
        aug.photometric([c.float() for c in crops], gen())


def test_pretrain_gpu_augmentation_on_a_folder_and_bad_option(tmp_path, image_dir, capsys, caplog):
    caplog.set_level("INFO", logger="training")
    out = tmp_path / "run"
    args = tiny_args(image_dir, out, "--augment_device", "gpu", "--epochs", "1")
    assert main(args + ["--warmup_epochs", "0"]) == 0
    assert load_checkpoint(out / "checkpoint.pth")["args"]["canvas_size"] == 0
    assert "gpu augmentation, crops cut by the loader" in caplog.text
    canvas = tiny_args(image_dir, tmp_path / "canvas", "--augment_device", "gpu", "--epochs", "1")
    assert main(canvas + ["--canvas_size", "40"]) == 0
    assert "gpu augmentation, canvas" in caplog.text
    assert main(tiny_args(image_dir, out, "--augment_device", "tpu")) == 2
    assert "augment_device" in capsys.readouterr().err


def test_folder_gpu_path_resumes_exactly_with_loader_workers(tmp_path, image_dir):
    """The default GPU path for folders (crops cut in worker processes) resumes bit for bit."""
    full, split = tmp_path / "full", tmp_path / "split"
    opts = ("--augment_device", "gpu", "--num_workers", "2", "--local_crops_number", "1")
    assert main(tiny_args(image_dir, full, *opts)) == 0
    assert main(tiny_args(image_dir, split, *opts, "--max_epochs_this_run", "1")) == 0
    assert main(tiny_args(image_dir, split, *opts)) == 0
    a = load_checkpoint(full / "checkpoint.pth")
    b = load_checkpoint(split / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs after resume"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def test_zero_hue_shift_is_exact_so_solarisation_sees_true_8_bit_values():
    x = torch.arange(256, dtype=torch.float32).div(255).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = x.clone()
    x[1, 0] = x[1, 0].flip(-1)  # a coloured image as well as a gray one
    assert torch.equal(adjust_hue(x, torch.zeros(2)), x)
    out = solarize(adjust_hue(x, torch.zeros(2)), torch.ones(2, dtype=torch.bool))
    at_threshold = x == 128 / 255
    assert torch.equal(out[at_threshold], 1 - x[at_threshold])  # 128 -> 127, as PIL
