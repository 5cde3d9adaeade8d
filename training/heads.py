"""The DINO projection head (Caron et al., 2021, Sec. 3 and Appendix; ``DINOHead``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Key names of torch.nn.utils.parametrizations.weight_norm, mapped onto the official names.
_NEW_STYLE_KEYS = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation ``W = g * V / ||V||`` (row-wise).

    The parameters are named ``weight_g [out, 1]`` and ``weight_v [out, in]`` like the
    deprecated ``torch.nn.utils.weight_norm``, so the official checkpoints load directly;
    the new-style ``parametrizations.weight.original0/1`` keys load as well.

    Args:
        in_features: Input width.
        out_features: Output width.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # PyTorch's default Linear init (kaiming-uniform, a = sqrt(5): bound 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """The effective weight ``g * v / ||v||`` with the norm over each output row."""
        norm = self.weight_v.norm(dim=1, keepdim=True)  # (out, 1)
        weight: Tensor = self.weight_v * (self.weight_g / norm)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T``."""
        return F.linear(x, self.weight)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for new, old in _NEW_STYLE_KEYS.items():
            if prefix + new in state_dict and prefix + old not in state_dict:
                state_dict[prefix + old] = state_dict.pop(prefix + new)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class DINOHead(nn.Module):
    """MLP, L2-normalised bottleneck, then a weight-normalised linear layer without bias.

    State-dict keys follow the reference: ``mlp.0/2/4`` (``mlp.0/1/3/4/6`` with BatchNorm),
    ``last_layer.weight_g`` and ``last_layer.weight_v``.

    Args:
        in_dim: Backbone embedding width.
        out_dim: Output dimension K (65536 in the paper).
        use_bn: BatchNorm after the hidden Linears.
        norm_last_layer: Freeze ``weight_g`` at 1, so each output is a cosine similarity.
        nlayers: Linear layers of the MLP (at least 1).
        hidden_dim: Hidden width of the MLP.
        bottleneck_dim: Output width of the MLP.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp: nn.Module
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Created after the init above: it keeps PyTorch's default Linear init (as the reference).
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_dim] -> [B, out_dim]``."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # type: ignore[no-any-return]
