"""Backbone + head over a list of crops of several resolutions (the reference MultiCropWrapper)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.vit import VisionTransformer


class MultiCropWrapper(nn.Module):
    """Runs the backbone over runs of consecutive same-resolution crops, the head once.

    State-dict keys are ``backbone.<vit key>`` and ``head.<head key>`` as in the reference.

    Args:
        backbone: Module mapping ``[B, 3, H, W]`` to CLS embeddings ``[B, D]``.
        head: Module mapping ``[N, D]`` to logits ``[N, K]``.
        pack_crops: Run all resolutions in one packed backbone call when the backbone is a
            :class:`~models.vit.VisionTransformer` (False: one call per resolution).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pack_crops: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pack_crops = pack_crops

    def forward(self, crops: list[Tensor]) -> Tensor:
        """Logits of all crops, crop-major: ``[len(crops) * B, K]``.

        A :class:`~models.vit.VisionTransformer` backbone gets all runs in one packed call
        (the same embeddings, with one pass of each layer over the tokens of every crop);
        another backbone is called once per run, as in the reference.
        """
        batches: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batches.append(torch.cat(crops[start:end]) if end - start > 1 else crops[start])
            start = end
        if self.pack_crops and len(batches) > 1 and isinstance(self.backbone, VisionTransformer):
            features = self.backbone(batches)  # (len(crops) * B, D)
        else:
            outputs = [self.backbone(batch) for batch in batches]  # each (n_crops_in_run * B, D)
            features = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return self.head(features)  # type: ignore[no-any-return]
