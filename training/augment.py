"""DINO multi-crop augmentation (Caron et al., 2021, Sec. 3 and ``DataAugmentationDINO``).

Two global crops and N local crops per image, with torchvision transforms v2 on PIL images:
bicubic RandomResizedCrop, horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8,
grayscale with p=0.2, PIL Gaussian blur (radius U(0.1, 2)) with p = 1.0 / 0.1 / 0.5 and
solarisation (threshold 128) with p=0.2 on the second global crop only, ImageNet normalisation.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PILGaussianBlur:
    """PIL Gaussian blur with radius ~ U(min, max), applied with probability ``p``.

    Draws from Python's ``random`` module, as the reference (``random.random() <= p``).
    """

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        """Blur or pass through."""
        if random.random() > self.p:
            return img
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class PILSolarization:
    """PIL solarisation (invert pixels >= ``threshold``), applied with probability ``p``.

    Draws its coin from Python's ``random`` module as the reference does
    (``random.random() < p``), so that with the same seeds the torch generator's stream, and
    with it every later crop, is the reference's.
    """

    def __init__(self, p: float, threshold: int = 128) -> None:
        self.p = p
        self.threshold = threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        """Solarise or pass through."""
        if random.random() < self.p:
            return ImageOps.solarize(img, threshold=self.threshold)
        return img


def _flip_and_color() -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply(
                [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
            ),
            v2.RandomGrayscale(p=0.2),
        ]
    )


def _normalize() -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def _resized_crop(size: int, scale: tuple[float, float]) -> v2.RandomResizedCrop:
    """The reference's crop: bicubic RandomResizedCrop (antialiased, as PIL resizes)."""
    return v2.RandomResizedCrop(
        size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
    )


class MultiCropGeometry:
    """The geometric half of :class:`DataAugmentationDINO`, for the GPU path on image folders.

    PIL image -> ``[global_1, global_2, local_1 ... local_N]`` uint8 ``[3, S, S]`` tensors: the
    reference's RandomResizedCrop of the whole image and the horizontal flip (p=0.5), drawn
    as the CPU path draws them. ``training.gpu_augment.BatchedMultiCrop.photometric`` does the
    rest on the device. The flip commutes with every later operation, so doing it here keeps
    the reference's order of operations in effect.

    Args:
        global_crops_scale: Area fraction range of the global crops.
        local_crops_scale: Area fraction range of the local crops.
        local_crops_number: Number of local crops (0 disables them).
        global_size: Side of the global crops.
        local_size: Side of the local crops.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
    ) -> None:
        self.local_crops_number = local_crops_number

        def pipeline(size: int, scale: tuple[float, float]) -> Callable[[Image.Image], Tensor]:
            steps = [_resized_crop(size, scale), v2.RandomHorizontalFlip(p=0.5), v2.PILToTensor()]
            return v2.Compose(steps)  # type: ignore[no-any-return]

        self.global_crop = pipeline(global_size, global_crops_scale)
        self.local_crop = pipeline(local_size, local_crops_scale)

    @property
    def ncrops(self) -> int:
        """Crops per image."""
        return 2 + self.local_crops_number

    def __call__(self, image: Image.Image) -> list[Tensor]:
        """Contiguous uint8 crops of one RGB PIL image."""
        crops = [self.global_crop(image), self.global_crop(image)]
        crops.extend(self.local_crop(image) for _ in range(self.local_crops_number))
        return [crop.contiguous() for crop in crops]


class DataAugmentationDINO:
    """Callable PIL image -> list of crops ``[global_1, global_2, local_1 ... local_N]``.

    Args:
        global_crops_scale: Area fraction range of the global crops.
        local_crops_scale: Area fraction range of the local crops.
        local_crops_number: Number of local crops (0 disables them).
        global_size: Side of the global crops (224 in the paper).
        local_size: Side of the local crops (96 in the paper).
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
    ) -> None:
        self.local_crops_number = local_crops_number
        crop = _resized_crop
        self.global_transfo1: Callable[[Image.Image], Tensor] = v2.Compose(
            [
                crop(global_size, global_crops_scale),
                _flip_and_color(),
                PILGaussianBlur(1.0),
                _normalize(),
            ]
        )
        self.global_transfo2: Callable[[Image.Image], Tensor] = v2.Compose(
            [
                crop(global_size, global_crops_scale),
                _flip_and_color(),
                PILGaussianBlur(0.1),
                PILSolarization(0.2),
                _normalize(),
            ]
        )
        self.local_transfo: Callable[[Image.Image], Tensor] = v2.Compose(
            [
                crop(local_size, local_crops_scale),
                _flip_and_color(),
                PILGaussianBlur(0.5),
                _normalize(),
            ]
        )

    @property
    def ncrops(self) -> int:
        """Crops per image."""
        return 2 + self.local_crops_number

    def __call__(self, image: Image.Image) -> list[Tensor]:
        """Crops of one RGB PIL image, each ``[3, size, size]`` float32 normalised, contiguous.

        ``ToImage`` yields a channels-last view of the PIL pixels; the crops are made contiguous
        so that every batch reaches the network in one memory layout (a compiled backbone
        specialises on it).
        """
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return [crop.contiguous() for crop in crops]
