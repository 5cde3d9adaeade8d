"""DINO multi-crop augmentation on whole batches, on the training device (``--augment_device gpu``).

The same recipe as ``training.augment.DataAugmentationDINO`` (the reference CPU path). Two
entry points:

* :meth:`BatchedMultiCrop.photometric` (image folders, the default): the data loader cuts the
  crops exactly as the reference (``training.augment.MultiCropGeometry``: bicubic
  RandomResizedCrop of the whole image, antialiased, and the flip) and sends them as uint8;
  the colour operations, blur, solarisation and normalisation run here, in batches.
* :meth:`BatchedMultiCrop.__call__` on uint8 images ``[B, 3, H, W]`` that all share one size
  (Fashion-MNIST, or the ``--canvas_size`` squares): the crops are cut here too.

Every random choice is drawn per sample and per crop from a ``torch.Generator`` on the device,
without host synchronisation:

* RandomResizedCrop as torchvision draws it: area fraction ~ U(scale), aspect ratio
  log-uniform in (3/4, 4/3), integer box, 10 tries then the centre-crop fallback. The box is
  resampled with bicubic ``F.grid_sample`` (``align_corners=False``, border padding) on an affine
  grid that maps output pixel centres onto the box, with the horizontal flip (p=0.5) folded into
  the grid.
* ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, the four operations in an independent random order
  per sample and crop (as the CPU path, which draws one order per call): brightness (blend with
  black), contrast (blend with the image's mean luma), saturation (blend with the luma image),
  hue (shift in HSV space). RandomGrayscale p=0.2. Luma uses torchvision's weights
  (0.2989, 0.587, 0.114).
* PIL's Gaussian blur with sigma ~ U(0.1, 2.0) per sample: three passes per axis of PIL's
  "extended box" kernel (variance sigma^2 / 3 each, so sigma^2 in all, also for small sigma),
  replicate padding; p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals.
* Solarisation (values >= 128/255 become 1 - value) with p=0.2 on global crop 2 only.
* ImageNet normalisation.

Numerical differences from the PIL-based CPU path (statistically equivalent, not bitwise):
when the crops are cut here, PIL's bicubic (a=-0.5, widened when downscaling: antialiasing) is
replaced by ``grid_sample`` (a=-0.75, no antialiasing), so crops downscaled by more than ~1.5x
alias slightly, and taps near the crop border read the neighbouring pixels instead of repeating
the crop's edge. PIL rounds to 8 bits after every step (each blur pass included); here all steps
stay in float32 (on CUDA, cuDNN may run the blur convolution in TF32, a relative error around
1e-3). PIL's colour operations use integer luma (299/587/114) and a rounded mean for contrast,
and shift hue on a 256-step circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.augment import IMAGENET_MEAN, IMAGENET_STD

LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
RESIZED_CROP_TRIES = 10
SOLARIZE_THRESHOLD = 128
PIL_BLUR_PASSES = 3  # PIL's GaussianBlur: three extended-box passes per axis


@dataclass(frozen=True)
class ColorJitterRecipe:
    """Colour augmentation strengths and probabilities (the paper's values by default)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def sample_crop_boxes(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """RandomResizedCrop boxes drawn as torchvision's ``get_params``, vectorised.

    Args:
        count: Number of boxes.
        height: Image height.
        width: Image width.
        scale: Range of the box area as a fraction of the image area.
        ratio: Range of the box aspect ratio (width / height), sampled log-uniformly.
        generator: Source of randomness (its device is used).

    Returns:
        ``[count, 4]`` float32 ``(top, left, box_height, box_width)``, integer-valued.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    device = generator.device
    shape = (count, RESIZED_CROP_TRIES)
    target = area * (
        scale[0] + (scale[1] - scale[0]) * torch.rand(shape, generator=generator, device=device)
    )
    aspect = torch.exp(
        log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator, device=device)
    )
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first successful try
    found = ok.any(dim=1)
    # Fallback of torchvision: the largest centred box with a ratio inside the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    box_w = torch.where(found, w.gather(1, first).squeeze(1), float(fb_w))
    box_h = torch.where(found, h.gather(1, first).squeeze(1), float(fb_h))
    u_top = torch.rand(count, generator=generator, device=device)
    u_left = torch.rand(count, generator=generator, device=device)
    top = torch.where(found, torch.floor(u_top * (height - box_h + 1)), float((height - fb_h) // 2))
    left = torch.where(found, torch.floor(u_left * (width - box_w + 1)), float((width - fb_w) // 2))
    return torch.stack([top, left, box_h, box_w], dim=1)


def crop_grid(
    boxes: Tensor, flips: Tensor, height: int, width: int, size: int, views: int
) -> Tensor:
    """Sampling grid for ``grid_sample`` that resizes every box to ``size x size``.

    Output pixel centre ``u + 0.5`` maps to ``left + (u + 0.5) * box_width / size`` (the
    ``align_corners=False`` convention, as resizing a cropped image); a flipped sample reads its
    columns in reverse order. The ``views`` crops of one image are stacked along the height.

    Args:
        boxes: ``[views * B, 4]`` from :func:`sample_crop_boxes`, view-major.
        flips: ``[views * B]`` bool, horizontal flip.
        height: Canvas height.
        width: Canvas width.
        size: Output side.
        views: Crops per image.

    Returns:
        ``[B, views * size, size, 2]`` normalised ``(x, y)`` coordinates.
    """
    top, left, box_h, box_w = boxes.unbind(1)
    base = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) * (2.0 / size) - 1
    sign = 1.0 - 2.0 * flips.to(boxes.dtype)
    gx = (box_w * sign / width)[:, None] * base + ((2 * left + box_w) / width - 1)[:, None]
    gy = (box_h / height)[:, None] * base + ((2 * top + box_h) / height - 1)[:, None]
    batch = boxes.shape[0] // views
    gx = gx.view(views, batch, 1, size).expand(views, batch, size, size)  # [V, B, y, x]
    gy = gy.view(views, batch, size, 1).expand(views, batch, size, size)
    grid = torch.stack([gx, gy], dim=-1).transpose(0, 1)  # [B, V, size, size, 2]
    return grid.reshape(batch, views * size, size, 2)


def luma(x: Tensor) -> Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]`` grayscale (torchvision's weights)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (LUMA_WEIGHTS[0] * r).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2])


def _rows(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-image ``clamp(factor * x)`` (torchvision's brightness)."""
    return (x * _rows(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Per-image ``clamp(factor * x + (1 - factor) * mean luma)`` (torchvision's contrast)."""
    mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean, x, _rows(factor)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Per-image ``clamp(factor * x + (1 - factor) * luma)`` (torchvision's saturation)."""
    return torch.lerp(luma(x), x, _rows(factor)).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Per-image hue rotation by ``shift`` turns (in [-0.5, 0.5]) through HSV.

    RGB -> (hue, saturation, value) as torchvision computes it, hue shifted modulo 1, then
    back with channel ``n`` (R, G, B: 5, 3, 1) = ``v - v * s * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 * hue) mod 6``. Gray pixels (zero chroma) stay unchanged.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    # Hue in sextants, in [-1, 5): R max: (g - b) / c, G max: 2 + (b - r) / c, B max: 4 + ...
    sextant = torch.where(
        is_r, g - b, torch.where(is_g, (b - r) + 2.0 * chroma, (r - g) + 4.0 * chroma)
    ) / chroma.clamp_min(1e-12)
    hue6 = torch.remainder(sextant + 6.0 * shift.view(-1, 1, 1), 6.0)
    saturation = chroma / maxc.clamp_min(1e-12)
    k = torch.remainder(torch.stack([hue6 + 5.0, hue6 + 3.0, hue6 + 1.0], dim=1), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    value = maxc.unsqueeze(1)
    rotated = torch.addcmul(value, value * saturation.unsqueeze(1), weight, value=-1.0)
    # A zero shift must give the image back exactly (the HSV round trip is off by ~1e-7, which
    # would move 8-bit values across the solarisation threshold).
    return torch.where(_rows(shift == 0), x, rotated)


def apply_color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Brightness, contrast, saturation and hue per image, each image in its own order.

    Brightness, contrast and saturation are all ``clamp(f * x + (1 - f) * other)`` (other =
    black, mean luma, luma image), so one blend per position applies each image's chosen
    operation (``f = 1`` where nothing is due). Hue is computed once: an image's operations
    placed before its hue act in the first three blends, the others in the last three.

    Args:
        x: ``[N, 3, H, W]`` in [0, 1].
        factors: ``[N, 4]`` brightness, contrast, saturation factors and hue shift
            (``1, 1, 1, 0`` is the identity).
        order: ``[N, 4]`` a permutation of ``0..3`` per image (0 brightness, 1 contrast,
            2 saturation, 3 hue).

    Returns:
        The jittered images, ``[N, 3, H, W]``.
    """
    hue_pos = (order == 3).to(torch.uint8).argmax(dim=1)  # [N]
    bcs = _without_hue(order)  # [N, 3]
    ones = torch.ones_like(factors[:, 0])

    def blend_step(y: Tensor, slot: int, active: Tensor) -> Tensor:
        op = bcs[:, slot]
        f = torch.where(active, factors.gather(1, op.unsqueeze(1)).squeeze(1), ones)
        gray = luma(y)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        is_contrast = _rows((op == 1).to(y.dtype))
        is_saturation = _rows((op == 2).to(y.dtype))
        other = torch.addcmul(mean * is_contrast, gray, is_saturation)  # black for brightness
        return torch.lerp(other, y, _rows(f)).clamp_(0.0, 1.0)

    for slot in range(3):
        x = blend_step(x, slot, hue_pos > slot)
    x = adjust_hue(x, factors[:, 3])
    for slot in range(3):
        x = blend_step(x, slot, hue_pos <= slot)
    return x


def _without_hue(order: Tensor) -> Tensor:
    """``[N, 4]`` permutations -> ``[N, 3]`` the same order without the hue entry (3)."""
    position = torch.arange(4, device=order.device).expand_as(order)
    key = torch.where(order == 3, 4, position)  # hue sorts last, the others keep their place
    return order.gather(1, key.argsort(dim=1, stable=True)[:, :3])


def blur_radius(sigma_max: float) -> int:
    """Taps either side of centre one :func:`box_blur_kernels` pass needs up to ``sigma_max``."""
    sigma2 = sigma_max**2 / PIL_BLUR_PASSES
    return int(math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)) + 1


def box_blur_kernels(sigma: Tensor, radius: int) -> Tensor:
    """One pass of PIL's ``GaussianBlur(sigma)`` as 1-D kernels ``[N, 2 * radius + 1]``.

    PIL blurs with :data:`PIL_BLUR_PASSES` passes of an "extended box" (Gwosdek et al., 2011)
    whose variance is ``sigma**2 / passes``: ``2l + 1`` taps of weight 1 and one tap of
    weight ``a`` (the fractional part of the box radius) at each end, divided by
    ``2 (l + a) + 1``. Iterating it gives PIL's result, variance ``sigma**2`` included (a sampled
    Gaussian falls far short of it below sigma ~ 0.5).
    """
    sigma2 = sigma.unsqueeze(1) ** 2 / PIL_BLUR_PASSES  # (N, 1)
    whole = torch.floor((torch.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)  # l
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype).abs()  # (K,)
    taps = torch.where(t <= whole, 1.0, torch.where(t == whole + 1, frac, 0.0))  # (N, K)
    return taps / (2 * (whole + frac) + 1)


def separable_blur(x: Tensor, kernels: Tensor, passes: int = 1) -> Tensor:
    """Blur each image with its own 1-D kernel along both axes, ``passes`` times per axis.

    All horizontal passes, then all vertical ones (as PIL), each a grouped convolution with
    replicate padding (PIL repeats the edge pixels).

    Args:
        x: ``[N, C, H, W]``.
        kernels: ``[N, K]`` with K odd.
        passes: Times each axis is filtered.
    """
    n, c, h, w = x.shape
    k = kernels.shape[1]
    radius = k // 2
    weight = kernels.repeat_interleave(c, dim=0)  # [N * C, K]
    y = x.reshape(1, n * c, h, w)
    for _ in range(passes):
        padded = F.pad(y, (radius, radius, 0, 0), mode="replicate")
        y = F.conv2d(padded, weight.view(n * c, 1, 1, k), groups=n * c)
    for _ in range(passes):
        padded = F.pad(y, (0, 0, radius, radius), mode="replicate")
        y = F.conv2d(padded, weight.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: Tensor, apply: Tensor) -> Tensor:
    """Invert the values >= 128/255 of the images where ``apply`` is true."""
    # The Python scalar is rounded to x's dtype, as SOLARIZE_THRESHOLD / 255 computed in it.
    return torch.where(_rows(apply) & (x >= SOLARIZE_THRESHOLD / 255), 1.0 - x, x)


class BatchedMultiCrop:
    """Batched, device-side DINO multi-crop: uint8 canvases -> ``[g1, g2, l1 ... lN]``.

    Args:
        global_crops_scale: Area fraction range of the global crops.
        local_crops_scale: Area fraction range of the local crops.
        local_crops_number: Number of local crops (0 disables them).
        global_size: Side of the global crops.
        local_size: Side of the local crops.
        ratio: Aspect-ratio range of the crops.
        flip_p: Horizontal flip probability.
        color: Colour jitter and grayscale settings.
        blur_p: Blur probabilities of global 1, global 2 and the local crops.
        blur_sigma: Range of the blur's standard deviation in pixels.
        solarize_p: Solarisation probability of global crop 2.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        *,
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        color: ColorJitterRecipe | None = None,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: float = 0.2,
    ) -> None:
        self.global_crops_scale = global_crops_scale
        self.local_crops_scale = local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_size = global_size
        self.local_size = local_size
        self.ratio = ratio
        self.flip_p = flip_p
        self.color = color or ColorJitterRecipe()
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma
        self.blur_radius = blur_radius(blur_sigma[1])
        self.solarize_p = solarize_p

    @property
    def ncrops(self) -> int:
        """Crops per image."""
        return 2 + self.local_crops_number

    def __call__(self, images: Tensor, generator: torch.Generator) -> list[Tensor]:
        """Augment a batch.

        Args:
            images: ``[B, 3, H, W]`` uint8 on the generator's device.
            generator: Source of every random choice.

        Returns:
            ``2 + local_crops_number`` float32 tensors ``[B, 3, S, S]``, ImageNet-normalised.

        Raises:
            ValueError: Wrong dtype or shape, or the generator is on another device.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        same = images.device.type == generator.device.type and (images.device.index or 0) == (
            generator.device.index or 0
        )
        if not same:
            raise ValueError(
                f"images are on {images.device} but the generator on {generator.device}"
            )
        x = images.float().div_(255.0)
        blur_p, solarize_p = self.blur_p, self.solarize_p
        crops = self.views(
            x,
            self.global_size,
            self.global_crops_scale,
            [blur_p[0], blur_p[1]],
            [0.0, solarize_p],
            generator,
        )
        n = self.local_crops_number
        if n:
            crops += self.views(
                x, self.local_size, self.local_crops_scale, [blur_p[2]] * n, [0.0] * n, generator
            )
        return crops

    def views(
        self,
        x: Tensor,
        size: int,
        scale: tuple[float, float],
        blur_p: Sequence[float],
        solarize_p: Sequence[float],
        generator: torch.Generator,
    ) -> list[Tensor]:
        """Crops of side ``size`` of every image of ``x`` (``[B, 3, H, W]`` in [0, 1]).

        ``blur_p`` and ``solarize_p`` hold one probability per view (their length is the number
        of views). Rows of the intermediate ``[views * B, ...]`` tensors are view-major.
        """
        batch, _, height, width = x.shape
        views = len(blur_p)
        rows = views * batch
        device = generator.device
        boxes = sample_crop_boxes(rows, height, width, scale, self.ratio, generator)
        flips = torch.rand(rows, generator=generator, device=device) < self.flip_p
        grid = crop_grid(boxes, flips, height, width, size, views).to(x.dtype)
        out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
        out = out.view(batch, 3, views, size, size).permute(2, 0, 1, 3, 4)  # [V, B, 3, S, S]
        y = out.reshape(rows, 3, size, size).clamp_(0.0, 1.0)
        return self._photometric(y, batch, blur_p, solarize_p, generator)

    def photometric(self, crops: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
        """Colour, blur, solarisation and normalisation of crops the loader already cut.

        The loader's :class:`training.augment.MultiCropGeometry` makes the crops exactly as the
        reference (bicubic RandomResizedCrop of the whole image, antialiased, then the flip);
        this runs the rest of the recipe on the device, in batches.

        Args:
            crops: ``2 + local_crops_number`` uint8 tensors ``[B, 3, S, S]``, global crops first,
                on the generator's device.
            generator: Source of every random choice.

        Returns:
            Float32 crops in the same order, ImageNet-normalised.

        Raises:
            ValueError: Wrong number, dtype or shape of the crops.
        """
        if len(crops) != self.ncrops:
            raise ValueError(f"expected {self.ncrops} crops, got {len(crops)}")
        for crop in crops:
            if crop.dtype != torch.uint8 or crop.ndim != 4 or crop.shape[1] != 3:
                raise ValueError(
                    f"expected uint8 crops [B, 3, S, S], got {crop.dtype} {tuple(crop.shape)}"
                )
        blur_p, solarize_p = self.blur_p, self.solarize_p
        n = self.local_crops_number
        groups = [(crops[:2], [blur_p[0], blur_p[1]], [0.0, solarize_p])]
        if n:
            groups.append((crops[2:], [blur_p[2]] * n, [0.0] * n))
        out: list[Tensor] = []
        for group, blur, solarize_ in groups:
            batch = group[0].shape[0]
            y = torch.cat(list(group)).float().div_(255.0)  # (V * B, 3, S, S), view-major
            out += self._photometric(y, batch, blur, solarize_, generator)
        return out

    def _photometric(
        self,
        y: Tensor,
        batch: int,
        blur_p: Sequence[float],
        solarize_p: Sequence[float],
        generator: torch.Generator,
    ) -> list[Tensor]:
        """Jitter, grayscale, blur, solarise and normalise ``[views * B, 3, S, S]`` in [0, 1]."""
        rows, size = y.shape[0], y.shape[-1]
        views = rows // batch
        device = generator.device

        def coin(p: Sequence[float] | float) -> Tensor:
            draw = torch.rand(rows, generator=generator, device=device)
            if isinstance(p, float | int):
                return draw < p
            # Per-view probabilities built on the device (no host-to-device copy, no sync).
            prob = torch.cat([torch.full((batch,), float(q), device=device) for q in p])
            return draw < prob

        c = self.color
        jitter = coin(c.jitter_p)
        factors = torch.stack(
            [
                torch.where(
                    jitter,
                    _uniform(rows, max(0.0, 1 - c.brightness), 1 + c.brightness, generator),
                    1.0,
                ),
                torch.where(
                    jitter, _uniform(rows, max(0.0, 1 - c.contrast), 1 + c.contrast, generator), 1.0
                ),
                torch.where(
                    jitter,
                    _uniform(rows, max(0.0, 1 - c.saturation), 1 + c.saturation, generator),
                    1.0,
                ),
                torch.where(jitter, _uniform(rows, -c.hue, c.hue, generator), 0.0),
            ],
            dim=1,
        )  # [rows, 4]; the identity where the jitter is not applied
        order = torch.rand(rows, 4, generator=generator, device=device).argsort(dim=1)
        y = apply_color_jitter(y, factors.to(y.dtype), order)
        gray = coin(c.grayscale_p)
        y = torch.where(_rows(gray), luma(y).expand_as(y), y)

        blur = coin(blur_p)
        sigma = _uniform(rows, self.blur_sigma[0], self.blur_sigma[1], generator)
        kernels = box_blur_kernels(sigma, self.blur_radius)
        delta = torch.zeros_like(kernels)
        delta[:, self.blur_radius] = 1.0
        kernels = torch.where(blur.unsqueeze(1), kernels, delta).to(y.dtype)
        y = separable_blur(y, kernels, passes=PIL_BLUR_PASSES)
        y = solarize(y, coin(solarize_p))

        for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
            y[:, channel].sub_(mean).div_(std)
        return list(y.view(views, batch, 3, size, size).unbind(0))
