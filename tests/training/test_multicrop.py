"""MultiCropWrapper: packed ViT pass against the reference's one call per resolution."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.vit import VisionTransformer, ViTConfig
from training.heads import DINOHead
from training.multicrop import MultiCropWrapper


def crops() -> list[Tensor]:
    torch.manual_seed(3)
    return [torch.randn(4, 3, 32, 32) for _ in range(2)] + [
        torch.randn(4, 3, 16, 16) for _ in range(3)
    ]


def assert_same_outputs_and_gradients(packed: MultiCropWrapper, looped: MultiCropWrapper) -> None:
    outputs = [model(crops()) for model in (packed, looped)]
    assert outputs[0].shape == (20, 64)  # crop-major: 5 crops x 4 images
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for out in outputs:
        out.square().sum().backward()
    for (name, a), (_, b) in zip(packed.named_parameters(), looped.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_crops_match_one_call_per_resolution() -> None:
    torch.manual_seed(0)
    config = ViTConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
    packed = MultiCropWrapper(
        VisionTransformer(config), DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    )
    looped = copy.deepcopy(packed)
    looped.pack_crops = False
    assert_same_outputs_and_gradients(packed, looped)


def test_packed_crops_with_stochastic_depth_match_one_call_per_resolution() -> None:
    """Given the same per-image draws, the packed student equals the reference's per-resolution
    calls, outputs and gradients (the draws are injected in call order)."""
    torch.manual_seed(0)
    config = ViTConfig(patch_size=8, embed_dim=32, depth=3, num_heads=2, img_size=32)
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    packed = MultiCropWrapper(VisionTransformer(config, drop_path_rate=0.5), head).train()
    looped = copy.deepcopy(packed)
    looped.pack_crops = False
    indices, keep = packed.backbone._drop_blocks()
    keep_t = torch.tensor(keep)[:, None]
    draws = (torch.rand(len(keep), 20) + keep_t).floor() / keep_t  # (J, 20 images of 5 crops)
    assert (draws == 0).any()

    def in_call_order() -> Callable[[int, torch.device], tuple[list[int], Tensor]]:
        offset = [0]

        def draw(batch: int, _device: torch.device) -> tuple[list[int], Tensor]:
            part = draws[:, offset[0] : offset[0] + batch]
            offset[0] += batch
            return indices, part

        return draw

    for model in (packed, looped):
        model.backbone._draw_scales = in_call_order()  # type: ignore[method-assign]
    assert_same_outputs_and_gradients(packed, looped)


def test_other_backbones_get_one_call_per_resolution() -> None:
    calls: list[tuple[int, ...]] = []

    class Pool(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))  # (B, 3)

    wrapper = MultiCropWrapper(Pool(), nn.Identity())
    out = wrapper(crops())
    assert calls == [(8, 3, 32, 32), (12, 3, 16, 16)]
    assert out.shape == (20, 3)
