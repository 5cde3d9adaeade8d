"""Multi-crop probabilities of both augmentation paths against the reference recipe.

dino-reference.md, section 1.2 (``DataAugmentationDINO``): crops in the order ``[global_1,
global_2, local_1 ... local_N]``; Gaussian blur with p 1.0 on global crop 1, 0.1 on global crop 2
and 0.5 on every local crop; solarisation with p 0.2 on global crop 2 only; grayscale with p 0.2
on every crop. The rates are observed on seeded runs of the CPU path (``training.augment``, PIL)
and of the batched path (``training.gpu_augment``, run here on CPU tensors), from the outputs
where possible:

* grayscale: all three channels of the output are equal (the inputs are colourful noise, and
  colour jitter never takes the saturation to 0);
* solarisation: the inputs are a uniform light grey (240), which every other operation keeps
  uniform at 144 or more (brightness factor >= 0.6), while solarising maps every value >= 128 to
  255 - value <= 127: a crop was solarised exactly when its brightest pixel is below 128;
* blur, CPU path: the output crop is (the solarisation of) an image that went through PIL's
  ``GaussianBlur`` filter during that call; blur, batched path: the output differs from a replay
  with the same generator seed and ``blur_p=(0, 0, 0)`` by more than 1e-3 pixel levels (here
  every blurred crop differs by more than one level, every other crop by exactly 0).

Each rate is checked exactly for p in {0, 1}, else within 5 standard deviations of a binomial
proportion (a fair draw misses by that much with probability ~6e-7). The seeds are fixed, so the
outcome is deterministic anyway; the bound keeps it robust to a reseed and tight enough to tell
0.1 from 0.2 and 0.2 from 0.5. Joint rates over two crops of one image (p1 * p2) check that every
crop draws its own coins, as the reference's separate transforms do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from training.augment import DataAugmentationDINO
from training.gpu_augment import BatchedMultiCrop

GLOBAL_SIZE, LOCAL_SIZE = 8, 4
LOCAL_CROPS = 3
BLUR_P = [1.0, 0.1] + [0.5] * LOCAL_CROPS  # per output crop, in the reference's order
SOLARIZE_P = [0.0, 0.2] + [0.0] * LOCAL_CROPS
GRAYSCALE_P = 0.2
# The reference's normalisation constants, to read the outputs back as pixels.
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
LIGHT_GREY = 240


def assert_rate(fired: Tensor, p: float, what: str) -> None:
    """``fired``: bool outcomes of independent Bernoulli(p) draws."""
    n = fired.numel()
    rate = fired.float().mean().item()
    if p in (0.0, 1.0):
        assert rate == p, f"{what}: rate {rate:.4f} over {n}, expected exactly {p}"
    else:
        bound = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(rate - p) < bound, f"{what}: rate {rate:.4f} over {n}, expected {p} ± {bound}"


def pixels(crops: Tensor) -> Tensor:
    """Normalised ``[..., 3, H, W]`` crops back to [0, 255] pixel values (float)."""
    return (crops * STD + MEAN) * 255.0


def is_gray(values: Tensor) -> Tensor:
    """``[N, 3, H, W]`` -> ``[N]``: all three channels equal (to float32 noise)."""
    spread = values.amax(dim=1) - values.amin(dim=1)  # (N, H, W)
    return spread.flatten(1).amax(dim=1) < 1e-3


def solarized(values: Tensor) -> Tensor:
    """``[N, 3, H, W]`` crops of the light-grey input -> ``[N]``: solarised."""
    brightest = values.flatten(1).amax(dim=1)
    # The oracle's two outcomes are far apart: <= 255 - 0.6 * 240 = 111, or >= 144.
    assert not ((brightest > 113) & (brightest < 142)).any(), brightest
    return brightest < 128


def colour_noise(shape: tuple[int, ...], seed: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# CPU path (PIL, the reference's implementation).


def run_cpu_path(image: Image.Image, calls: int) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """``calls`` seeded runs of ``DataAugmentationDINO`` on ``image``.

    Returns:
        Per call: the output crops as pixels (``[3, S, S]`` float, integer-valued) and the
        results of the PIL ``GaussianBlur`` filters applied during the call (``[3, S, S]``).
    """
    random.seed(0)  # the blur draws from Python's random (as the reference), the rest from torch
    torch.manual_seed(0)
    augment = DataAugmentationDINO(
        local_crops_number=LOCAL_CROPS, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE
    )
    sizes = [GLOBAL_SIZE] * 2 + [LOCAL_SIZE] * LOCAL_CROPS
    outputs: list[list[Tensor]] = []
    blurred: list[list[Tensor]] = []
    original_filter = Image.Image.filter

    def spy(self: Image.Image, filter: Any) -> Image.Image:
        out = original_filter(self, filter)
        if isinstance(filter, ImageFilter.GaussianBlur):
            blurred[-1].append(torch.from_numpy(np.array(out)).permute(2, 0, 1).float())
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image.Image, "filter", spy)
        for _ in range(calls):
            blurred.append([])
            crops = augment(image)
            assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in sizes]
            values = [pixels(c) for c in crops]
            # ToImage, ToDtype and Normalize of 8-bit values: the pixels come back exactly.
            assert all((v - v.round()).abs().max() < 1e-3 for v in values)
            outputs.append([v.round() for v in values])
    return outputs, blurred


def per_crop(predicate: Callable[[Tensor], Tensor], outputs: list[list[Tensor]]) -> Tensor:
    """``[calls, crops]`` bool: ``predicate`` of every output crop of every call."""
    return torch.tensor([[bool(predicate(c.unsqueeze(0))) for c in crops] for crops in outputs])


def test_cpu_path_blur_and_grayscale_rates_per_crop() -> None:
    calls = 900
    image = Image.fromarray(colour_noise((16, 16, 3), seed=1))
    outputs, blurred = run_cpu_path(image, calls)
    blur = torch.zeros(calls, len(BLUR_P), dtype=torch.bool)
    gray = per_crop(is_gray, outputs)
    for call, (crops, filtered) in enumerate(zip(outputs, blurred, strict=True)):
        for view, crop in enumerate(crops):
            blur[call, view] = any(
                torch.equal(crop, b) or torch.equal(crop, torch.where(b >= 128, 255 - b, b))
                for b in filtered
                if b.shape == crop.shape
            )
        assert int(blur[call].sum()) == len(filtered)  # each blur is one crop of the call
    for view, p in enumerate(BLUR_P):
        assert_rate(blur[:, view], p, f"blur of crop {view}")
    assert_rate(gray[:, :2], GRAYSCALE_P, "grayscale of the global crops")
    assert_rate(gray[:, 2:], GRAYSCALE_P, "grayscale of the local crops")
    # Drawn independently for every crop of an image.
    assert_rate(gray[:, 0] & gray[:, 1], GRAYSCALE_P**2, "grayscale of both global crops")
    assert_rate(gray[:, 2] & gray[:, 3], GRAYSCALE_P**2, "grayscale of two local crops")
    assert_rate(blur[:, 1] & blur[:, 2], BLUR_P[1] * BLUR_P[2], "blur of global 2 and local 1")


def test_cpu_path_solarizes_global_crop_2_only() -> None:
    calls = 900
    image = Image.new("RGB", (16, 16), (LIGHT_GREY,) * 3)
    outputs, _ = run_cpu_path(image, calls)
    fired = per_crop(solarized, outputs)
    for view, p in enumerate(SOLARIZE_P):
        assert_rate(fired[:, view], p, f"solarisation of crop {view}")


class _Oracle:
    """The reference pipeline as section 1.2 describes it, on torchvision's v1 transforms.

    Blur fires when ``random.random() <= p`` (radius ``random.uniform(0.1, 2)``), solarisation
    when ``random.random() < p`` (PIL's ``ImageOps.solarize``, threshold 128): both draw from
    Python's ``random``, everything else from torch's generator.
    """

    def __init__(self, local_crops: int, global_size: int, local_size: int) -> None:
        from torchvision import transforms as v1

        def blur(p: float) -> Callable[[Image.Image], Image.Image]:
            def apply(img: Image.Image) -> Image.Image:
                if random.random() <= p:
                    radius = random.uniform(0.1, 2.0)
                    return img.filter(ImageFilter.GaussianBlur(radius=radius))
                return img

            return apply

        def solarize(img: Image.Image) -> Image.Image:
            return ImageOps.solarize(img) if random.random() < 0.2 else img

        flip_and_color = v1.Compose(
            [
                v1.RandomHorizontalFlip(p=0.5),
                v1.RandomApply(
                    [v1.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                    p=0.8,
                ),
                v1.RandomGrayscale(p=0.2),
            ]
        )
        normalize = v1.Compose(
            [v1.ToTensor(), v1.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        )
        bicubic = v1.InterpolationMode.BICUBIC

        def crop(size: int, scale: tuple[float, float]) -> Any:
            return v1.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

        self.global1 = v1.Compose(
            [crop(global_size, (0.4, 1.0)), flip_and_color, blur(1.0), normalize]
        )
        self.global2 = v1.Compose(
            [crop(global_size, (0.4, 1.0)), flip_and_color, blur(0.1), solarize, normalize]
        )
        self.local = v1.Compose(
            [crop(local_size, (0.05, 0.4)), flip_and_color, blur(0.5), normalize]
        )
        self.local_crops = local_crops

    def __call__(self, image: Image.Image) -> list[Tensor]:
        crops = [self.global1(image), self.global2(image)]
        return crops + [self.local(image) for _ in range(self.local_crops)]


def test_cpu_path_is_the_reference_draw_for_draw() -> None:
    # Same seeds, same random streams: every crop equal to the reference pipeline's, so a
    # seeded run reproduces the original's inputs (a torch coin for solarisation would shift
    # the torch stream and change every later crop).
    image = Image.fromarray(colour_noise((40, 52, 3), seed=3))
    sizes = {"local_crops": LOCAL_CROPS, "global_size": GLOBAL_SIZE, "local_size": LOCAL_SIZE}
    ours = DataAugmentationDINO(
        local_crops_number=LOCAL_CROPS, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE
    )
    reference = _Oracle(**sizes)
    results = []
    solarised = 0
    for pipeline in (ours, reference):
        random.seed(5)
        torch.manual_seed(5)
        results.append([pipeline(image) for _ in range(60)])
    for call, (mine, theirs) in enumerate(zip(*results, strict=True)):
        for view, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            # The same 8-bit pixels; ToTensor and ToDtype+Normalize round apart by ~1e-7.
            assert torch.equal(pixels(a).round(), pixels(b).round()), f"call {call}, crop {view}"
            assert torch.allclose(a, b, rtol=0, atol=1e-6)
        solarised += int(pixels(mine[1]).amax() <= 127)  # solarising leaves nothing above 127
    assert solarised > 0  # the comparison saw solarised crops too


# ------------------------------------------------------------------------------------------
# Batched path (training.gpu_augment) on CPU tensors, through both of its entry points.

BATCH = 2000
ENTRIES = ["loader crops", "whole images"]


def run_batched_path(entry: str, images: Tensor, **recipe: Any) -> list[Tensor]:
    """One seeded batch through ``photometric`` (crops the loader cut) or ``__call__``.

    Args:
        entry: One of ENTRIES.
        images: ``[BATCH, 3, H, W]`` uint8; for ``loader crops``, windows of it (one offset
            per crop) are the crops.
        recipe: Keyword options of ``BatchedMultiCrop`` (the reference's defaults otherwise).

    Returns:
        The crops as pixels, ``[BATCH, 3, S, S]`` float each.
    """
    augment = BatchedMultiCrop(
        local_crops_number=LOCAL_CROPS, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE, **recipe
    )
    generator = torch.Generator().manual_seed(0)
    sizes = [GLOBAL_SIZE] * 2 + [LOCAL_SIZE] * LOCAL_CROPS
    if entry == "loader crops":
        cut = [images[:, :, v : v + s, v : v + s].contiguous() for v, s in enumerate(sizes)]
        crops = augment.photometric(cut, generator)
    else:
        crops = augment(images, generator)
    assert [tuple(c.shape) for c in crops] == [(BATCH, 3, s, s) for s in sizes]
    return [pixels(c) for c in crops]


@pytest.mark.parametrize("entry", ENTRIES)
def test_batched_path_rates_per_crop(entry: str) -> None:
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (BATCH, 3, 16, 16), dtype=torch.uint8, generator=g)
    crops = run_batched_path(entry, noise)
    unblurred = run_batched_path(entry, noise, blur_p=(0.0, 0.0, 0.0))
    blur = torch.stack(
        [(c - u).flatten(1).abs().amax(dim=1) > 1e-3 for c, u in zip(crops, unblurred, strict=True)]
    )  # (crops, BATCH); in pixel levels
    gray = torch.stack([is_gray(c) for c in crops])  # (crops, BATCH)
    for view, p in enumerate(BLUR_P):
        assert_rate(blur[view], p, f"blur of crop {view}")
        assert_rate(gray[view], GRAYSCALE_P, f"grayscale of crop {view}")
    # Drawn independently for every crop of an image.
    assert_rate(gray[0] & gray[1], GRAYSCALE_P**2, "grayscale of both global crops")
    assert_rate(gray[2] & gray[3], GRAYSCALE_P**2, "grayscale of two local crops")
    assert_rate(blur[1] & blur[2], BLUR_P[1] * BLUR_P[2], "blur of global 2 and local 1")
    grey = torch.full((BATCH, 3, 16, 16), LIGHT_GREY, dtype=torch.uint8)
    for view, crop in enumerate(run_batched_path(entry, grey)):
        assert_rate(solarized(crop), SOLARIZE_P[view], f"solarisation of crop {view}")
