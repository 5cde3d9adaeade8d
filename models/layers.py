"""Building blocks of the DINO Vision Transformer (official parameter names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth per sample; kept samples are scaled by ``1 / keep_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()  # 1 with probability keep_prob
    return x.div(keep_prob) * random_tensor


def drop_path_scales(keep_prob: Tensor, batch: int) -> Tensor:
    """Stochastic-depth scales for many branches in one draw: ``[J, B]`` float32.

    Per branch ``j`` and sample ``b`` the scale is ``floor(keep_prob[j] + U[0, 1))`` (1 with
    probability ``keep_prob[j]``, else 0) divided by ``keep_prob[j]``: :func:`drop_path`'s
    ``x.div(keep_prob) * mask`` as one multiplier, so a residual branch costs one multiply
    instead of five kernels.

    Args:
        keep_prob: ``[J]`` keep probabilities, on the device of the activations.
        batch: Samples ``B``.
    """
    draws = torch.rand(keep_prob.shape[0], batch, device=keep_prob.device)  # (J, B)
    keep = keep_prob[:, None].float()  # (J, 1)
    return (draws + keep).floor_().div_(keep)  # (J, B)


def scaled_residual(x: Tensor, branch: Tensor, scale: Tensor | None) -> Tensor:
    """``x + branch * scale`` in the residual stream's dtype (``x + branch`` without a scale).

    The product is formed in float32 (the scale's dtype) or wider and then rounded once to
    ``x``'s dtype, as the reference rounds ``branch.div(keep_prob)``: under autocast the stream
    is float32 and nothing is rounded; a bfloat16 or float16 model stays in its dtype.
    """
    if scale is None:
        return x + branch
    return x + (branch * scale).to(x.dtype)


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """Apply stochastic depth in training mode."""
        return drop_path(x, self.drop_prob, self.training)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution (incomplete rows/cols are dropped)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, (H/p)*(W/p), D]`` row-major over the patch grid."""
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, H/p * W/p, D)


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply fc1, GELU, fc2."""
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class Attention(nn.Module):
    """Multi-head self-attention with a fused path and an explicit-softmax path."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor, groups: Sequence[tuple[int, int]] | None = None) -> Tensor:
        """Fused attention (``F.scaled_dot_product_attention``).

        Args:
            x: Tokens ``[B, N, D]``; or, with ``groups``, packed rows ``[R, D]`` stacking
                several batches: batch ``g`` holds ``B_g`` sequences of ``N_g`` tokens
                (sample-major), ``R = sum(B_g * N_g)``. The projections then run once over all
                rows, and each token attends only to the tokens of its own sequence, so every
                row gets what it gets on its own batch.
            groups: ``(B_g, N_g)`` of each packed batch, in row order.
        """
        if groups is not None:
            return self._forward_packed(x, groups)
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
        projected: Tensor = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, D)
        return projected

    def _forward_packed(self, x: Tensor, groups: Sequence[tuple[int, int]]) -> Tensor:
        qkv = self.qkv(x)  # (R, 3D)
        outputs = []
        start = 0
        for batch, tokens in groups:
            rows = batch * tokens
            part = qkv[start : start + rows].view(batch, tokens, 3, self.num_heads, self.head_dim)
            q, k, v = part.permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, hd)
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
            outputs.append(out.transpose(1, 2).reshape(rows, -1))  # (B * N, D)
            start += rows
        merged = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # (R, D)
        projected: Tensor = self.proj(merged)
        return projected

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Explicit softmax attention, as the reference computes it.

        Returns:
            The block output ``[B, N, D]`` and the attention ``[B, heads, N, N]``.
        """
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, N)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj(out), attn


class Block(nn.Module):
    """Pre-norm block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float,
        qkv_bias: bool,
        norm_eps: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: Tensor,
        residual_scales: tuple[Tensor, Tensor] | None = None,
        groups: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Block with fused attention.

        Args:
            x: Tokens ``[B, N, D]``, or packed rows ``[R, D]`` with ``groups`` (see
                :meth:`Attention.forward`).
            residual_scales: Stochastic depth drawn by the caller for the attention and the
                MLP branch (:func:`drop_path_scales`): ``0`` (dropped) or ``1 / keep_prob``
                per sequence, each ``[B, 1, 1]`` (``[R, 1]`` for packed rows: a sequence's
                value on all its rows). None: this block's :class:`DropPath` draws them, which
                packed rows cannot use (it would draw per row).
            groups: ``(B_g, N_g)`` of each packed batch, in row order.

        Raises:
            ValueError: Packed rows in training with stochastic depth but no scales.
        """
        if residual_scales is None:
            if groups is None:
                x = x + self.drop_path(self.attn(self.norm1(x)))
                out: Tensor = x + self.drop_path(self.mlp(self.norm2(x)))
                return out
            if self.training and self.drop_path.drop_prob > 0:
                raise ValueError("packed rows need residual_scales drawn per sequence")
        attn_scale, mlp_scale = residual_scales or (None, None)
        x = scaled_residual(x, self.attn(self.norm1(x), groups), attn_scale)
        return scaled_residual(x, self.mlp(self.norm2(x)), mlp_scale)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Block with explicit attention; also returns the attention ``[B, heads, N, N]``."""
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn
