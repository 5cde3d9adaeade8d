"""Backbone + head over a list of crops of several resolutions (the reference MultiCropWrapper)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of consecutive same-resolution crops, the head once.

    State-dict keys are ``backbone.<vit key>`` and ``head.<head key>`` as in the reference.

    Args:
        backbone: Module mapping ``[B, 3, H, W]`` to CLS embeddings ``[B, D]``.
        head: Module mapping ``[N, D]`` to logits ``[N, K]``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> Tensor:
        """Logits of all crops, crop-major: ``[len(crops) * B, K]``."""
        outputs: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batch = torch.cat(crops[start:end]) if end - start > 1 else crops[start]
            outputs.append(self.backbone(batch))  # (n_crops_in_run * B, D)
            start = end
        features = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return self.head(features)  # type: ignore[no-any-return]
