"""An independent, functional re-statement of the reference DINO ViT forward (test oracle).

Written from the description of facebookresearch/dino's vision_transformer.py: explicit softmax
attention everywhere and ``F.interpolate(scale_factor=...)`` for the position embeddings,
including the ``+0.1`` offset and the "w is the height" naming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolate_pos_encoding(
    sd: dict[str, Tensor], x: Tensor, w: int, h: int, patch: int
) -> Tensor:
    npatch = x.shape[1] - 1
    N = sd["pos_embed"].shape[1] - 1
    if npatch == N and w == h:
        return sd["pos_embed"]
    class_pos_embed = sd["pos_embed"][:, 0]
    patch_pos_embed = sd["pos_embed"][:, 1:]
    dim = x.shape[-1]
    w0 = w // patch + 0.1
    h0 = h // patch + 0.1
    side = int(math.sqrt(N))
    grid = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == grid.shape[-2] and int(h0) == grid.shape[-1]
    grid = grid.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), grid), dim=1)


def _attention(sd: dict[str, Tensor], i: int, x: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    B, N, C = x.shape
    p = f"blocks.{i}.attn."
    qkv = F.linear(x, sd[p + "qkv.weight"], sd.get(p + "qkv.bias"))
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"]), attn


def _norm(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _block(sd: dict[str, Tensor], i: int, x: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    y, attn = _attention(sd, i, _norm(sd, f"blocks.{i}.norm1", x), heads)
    x = x + y
    p = f"blocks.{i}.mlp."
    h = F.gelu(
        F.linear(_norm(sd, f"blocks.{i}.norm2", x), sd[p + "fc1.weight"], sd[p + "fc1.bias"])
    )
    return x + F.linear(h, sd[p + "fc2.weight"], sd[p + "fc2.bias"]), attn


def prepare_tokens(sd: dict[str, Tensor], x: Tensor, patch: int) -> Tensor:
    B, nc, w, h = x.shape  # the reference calls the height "w"
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat((sd["cls_token"].expand(B, -1, -1), tokens), dim=1)
    return tokens + interpolate_pos_encoding(sd, tokens, w, h, patch)


def depth_of(sd: dict[str, Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def forward(sd: dict[str, Tensor], x: Tensor, patch: int, heads: int) -> Tensor:
    """Reference ``forward``: the CLS token after the final norm."""
    x = prepare_tokens(sd, x, patch)
    for i in range(depth_of(sd)):
        x, _ = _block(sd, i, x, heads)
    return _norm(sd, "norm", x)[:, 0]


def get_last_selfattention(sd: dict[str, Tensor], x: Tensor, patch: int, heads: int) -> Tensor:
    x = prepare_tokens(sd, x, patch)
    depth = depth_of(sd)
    for i in range(depth - 1):
        x, _ = _block(sd, i, x, heads)
    _, attn = _attention(sd, depth - 1, _norm(sd, f"blocks.{depth - 1}.norm1", x), heads)
    return attn


def get_intermediate_layers(sd: dict[str, Tensor], x: Tensor, patch: int, heads: int) -> Tensor:
    """``get_intermediate_layers(x, n=1)[0]``: last block output after the final norm."""
    x = prepare_tokens(sd, x, patch)
    for i in range(depth_of(sd)):
        x, _ = _block(sd, i, x, heads)
    return _norm(sd, "norm", x)
