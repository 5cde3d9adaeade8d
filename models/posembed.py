"""Position-embedding interpolation with the reference DINO numerics, export-friendly.

The reference (`vision_transformer.py`, ``interpolate_pos_encoding``) resizes the patch grid
of ``pos_embed`` with ``F.interpolate(mode="bicubic", scale_factor=((g_h+0.1)/s, (g_w+0.1)/s))``
where ``s = sqrt(N)`` and ``g = size // patch``. Because a scale factor is passed, PyTorch samples
at ``(dst + 0.5) / scale_factor - 0.5`` (not ``(dst + 0.5) * s / g - 0.5``), with the cubic
kernel ``a = -0.75`` and indices clamped to the edge. The stored embedding is returned unchanged
only when the token count matches and the pixel height equals the pixel width.

Here the same resampling is written as two small interpolation matrices. While tracing for
ONNX they are built from tensor arithmetic on the (dynamic) grid size, so the export takes any
height and width with no Python branch frozen at trace time. Otherwise (training, eager
inference, ``torch.compile``) the sizes are Python ints and the matrices, bit-identical to the
traced ones, are cached per size: no host-device copy and no graph break.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_near(t: Tensor) -> Tensor:
    """Cubic convolution weight for distances in [0, 1]."""
    return ((_CUBIC_A + 2) * t - (_CUBIC_A + 3)) * t * t + 1


def _cubic_far(t: Tensor) -> Tensor:
    """Cubic convolution weight for distances in [1, 2]."""
    return ((_CUBIC_A * t - 5 * _CUBIC_A) * t + 8 * _CUBIC_A) * t - 4 * _CUBIC_A


def bicubic_matrix(
    out_size: Tensor | int, in_size: int, *, identity: Tensor | bool, device: torch.device
) -> Tensor:
    """Interpolation matrix of PyTorch's bicubic resize with the DINO scale factor.

    Args:
        out_size: Target grid length ``g`` (``size // patch``): a 0-d int64 tensor (traced for
            export, dynamic) or a Python int (eager and ``torch.compile``).
        in_size: Stored grid length ``s`` (14 for 224/16).
        identity: When true the identity matrix is returned (the reference skips
            interpolation), which requires ``out_size == in_size``. A 0-d bool tensor with a
            tensor ``out_size``.
        device: Where to build the matrix (the sizes may live on the CPU: no device sync).

    Returns:
        Float32 matrix ``[g, s]`` such that ``resized = M @ grid`` along that axis. Both kinds of
        ``out_size`` give bit-identical matrices.
    """
    # scale_factor = (g + 0.1) / s in double, then PyTorch uses float(1.0 / scale_factor).
    if isinstance(out_size, Tensor):
        scale_factor = (out_size.to(torch.float64) + 0.1) / float(in_size)
        inv_scale = (1.0 / scale_factor).to(device=device, dtype=torch.float32)
    else:
        inv = 1.0 / ((out_size + 0.1) / float(in_size))
        inv_scale = torch.full((), inv, dtype=torch.float32, device=device)  # rounds as .to()
    dst = torch.arange(out_size, device=device).to(torch.float32)  # type: ignore[arg-type]  # (g,)
    cols = torch.arange(in_size, device=device).to(torch.float32)  # (s,)
    eye = (dst[:, None] == cols[None, :]).to(torch.float32)  # (g, s)
    if identity is True:
        return eye
    real = inv_scale * (dst + 0.5) - 0.5
    # guard_index_and_lambda: index = min(floor(real), s - 1), t = clamp(real - index, 0, 1).
    base = torch.clamp(torch.floor(real), max=float(in_size - 1))
    t = torch.clamp(real - base, 0.0, 1.0)
    weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
    matrix = torch.zeros_like(real)[:, None] * cols[None, :]  # (g, s) zeros, dynamic shape
    for k, w in enumerate(weights):
        tap = torch.clamp(base + (k - 1), 0.0, float(in_size - 1))  # (g,)
        matrix = matrix + (tap[:, None] == cols[None, :]).to(torch.float32) * w[:, None]
    if identity is False:
        return matrix
    return torch.where(torch.as_tensor(identity).to(device), eye, matrix)


@functools.lru_cache(maxsize=64)
def _cached_matrix(out_size: int, in_size: int, identity: bool, device: torch.device) -> Tensor:
    """:func:`bicubic_matrix` for Python-int sizes, built once per size and device.

    Built outside inference mode, so a matrix first made under ``torch.inference_mode`` can
    still be saved for backward by a later training step.
    """
    with torch.inference_mode(False), torch.no_grad():
        return bicubic_matrix(out_size, in_size, identity=identity, device=device)


def interpolate_pos_embed(
    pos_embed: Tensor, height: Tensor | int, width: Tensor | int, patch_size: int
) -> Tensor:
    """Position embeddings for an input of ``height x width`` pixels (reference numerics).

    Args:
        pos_embed: Stored embeddings ``[1, 1 + s*s, D]`` (CLS first).
        height: Input height in pixels: a 0-d int64 tensor while tracing for ONNX (the graph
            then resamples for any size), a Python int otherwise (the interpolation matrices
            are cached per size and device: no host-device copy, a handful of kernels).
        width: Input width in pixels, as ``height``.
        patch_size: Patch side in pixels.

    Returns:
        ``[1, 1 + g_h*g_w, D]`` with rows ``g_h = height // p`` and columns ``g_w = width // p``,
        row-major, in the dtype of ``pos_embed``.
    """
    num_stored = pos_embed.shape[1] - 1
    side = int(math.sqrt(num_stored))
    if side * side != num_stored:
        raise ValueError(f"pos_embed holds {num_stored} patch entries, not a square grid")
    dim = pos_embed.shape[-1]
    device = pos_embed.device
    if isinstance(height, int) and isinstance(width, int):
        grid_h, grid_w = height // patch_size, width // patch_size
        if grid_h * grid_w == num_stored and height == width:
            return pos_embed  # the reference returns the stored table unchanged
        build = bicubic_matrix if torch.compiler.is_compiling() else _cached_matrix
        rows = build(grid_h, side, identity=False, device=device)  # (g_h, s)
        cols = build(grid_w, side, identity=False, device=device)  # (g_w, s)
    else:
        grid_h_t = torch.div(height, patch_size, rounding_mode="floor")
        grid_w_t = torch.div(width, patch_size, rounding_mode="floor")
        identity = (grid_h_t * grid_w_t == num_stored) & (height == width)
        rows = bicubic_matrix(grid_h_t, side, identity=identity, device=device)  # (g_h, s)
        cols = bicubic_matrix(grid_w_t, side, identity=identity, device=device)  # (g_w, s)
    cls_pos = pos_embed[:, :1]
    grid = pos_embed[0, 1:].to(torch.float32).reshape(side, side, dim)  # (s, s, D)
    # float32 under autocast too: the reference's bicubic F.interpolate is not autocast.
    with torch.autocast(device.type, enabled=False):
        resized = torch.einsum("ia,jb,abd->ijd", rows, cols, grid)  # (g_h, g_w, D)
    patch_pos = resized.reshape(1, -1, dim).to(pos_embed.dtype)  # (1, g_h*g_w, D)
    return torch.cat((cls_pos, patch_pos), dim=1)
