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


def drop_path_scales(
    keep_prob: Tensor, batch: int, generator: torch.Generator | None = None
) -> Tensor:
    """Stochastic-depth scales for many branches in one draw (float32).

    Per branch ``j`` and sample ``b`` the scale is ``floor(keep_prob[j] + U[0, 1))`` (1 with
    probability ``keep_prob[j]``, else 0) divided by ``keep_prob[j]``: :func:`drop_path`'s
    ``x.div(keep_prob) * mask`` as one multiplier, so a residual branch costs one multiply
    instead of five kernels.

    Args:
        keep_prob: ``[J]`` keep probabilities, on the device of the activations.
        batch: Samples ``B``.
        generator: Optional random generator.

    Returns:
        ``[J, B, 1, 1]`` scales.
    """
    draws = torch.rand(
        keep_prob.shape[0], batch, dtype=torch.float32, device=keep_prob.device, generator=generator
    )  # (J, B)
    keep = keep_prob[:, None].float()  # (J, 1)
    return (draws + keep).floor_().div_(keep)[:, :, None, None]  # (J, B, 1, 1)


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

    def forward(self, x: Tensor) -> Tensor:
        """Fused attention (``F.scaled_dot_product_attention``)."""
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
        projected: Tensor = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, D)
        return projected

    def forward_packed(self, x: Tensor, groups: Sequence[tuple[int, int]]) -> Tensor:
        """Fused attention over packed rows: ``[R, D] -> [R, D]``.

        ``x`` stacks several batches of sequences as rows: batch ``g`` holds ``B_g`` sequences
        of ``N_g`` tokens (sample-major), ``R = sum(B_g * N_g)``. The projections run once over
        all rows; each token attends only to the tokens of its own sequence, so every row gets
        what :meth:`forward` gives it on its own batch.
        """
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

    def forward(self, x: Tensor, residual_scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Block with fused attention.

        Args:
            x: Tokens ``[B, N, D]``.
            residual_scales: Stochastic depth drawn by the caller for the attention and the
                MLP branch, each ``[B, 1, 1]`` holding ``0`` (dropped) or ``1 / keep_prob``
                (see :func:`drop_path_scales`); None draws them here (:class:`DropPath`).
        """
        if residual_scales is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            out: Tensor = x + self.drop_path(self.mlp(self.norm2(x)))
            return out
        attn_scale, mlp_scale = residual_scales
        x = x + self.attn(self.norm1(x)) * attn_scale
        out = x + self.mlp(self.norm2(x)) * mlp_scale
        return out

    def forward_packed(
        self,
        x: Tensor,
        groups: Sequence[tuple[int, int]],
        residual_scales: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The block over packed rows ``[R, D]`` (see :meth:`Attention.forward_packed`).

        Args:
            x: Packed tokens ``[R, D]``.
            groups: ``(B_g, N_g)`` of each packed batch, in row order.
            residual_scales: Stochastic depth of the two branches, each ``[R, 1]`` (one value
                per sequence, repeated over its tokens); None: no stochastic depth.
        """
        if residual_scales is None:
            x = x + self.attn.forward_packed(self.norm1(x), groups)
            out: Tensor = x + self.mlp(self.norm2(x))
            return out
        attn_scale, mlp_scale = residual_scales
        x = x + self.attn.forward_packed(self.norm1(x), groups) * attn_scale
        out = x + self.mlp(self.norm2(x)) * mlp_scale
        return out

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Block with explicit attention; also returns the attention ``[B, heads, N, N]``."""
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn
