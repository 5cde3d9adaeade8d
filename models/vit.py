"""The DINO Vision Transformer, compatible with the official checkpoints.

Parameter names follow facebookresearch/dino's ``vision_transformer.py`` so that an official
backbone ``state_dict`` loads with ``strict=True``. The released models' settings are the
defaults here: qkv bias, LayerNorm eps 1e-6, exact GELU, MLP ratio 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from models.layers import Block, PatchEmbed, drop_path_scales
from models.posembed import interpolate_pos_embed

# name -> (embed_dim, depth, num_heads), as the reference factories.
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}
HEAD_DIM = 64


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`VisionTransformer`.

    Attributes:
        patch_size: Patch side in pixels.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: Bias in the qkv projection (True in the released models).
        img_size: Training image side; fixes the length of ``pos_embed``.
        in_chans: Input channels.
        norm_eps: LayerNorm epsilon (1e-6 in the released models).
        arch: Architecture name for humans and metadata ("custom" when not a factory size).
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: int = 224
    in_chans: int = 3
    norm_eps: float = 1e-6
    arch: str = field(default="vit_small")

    def __post_init__(self) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "img_size", "in_chans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        """Patches of a training-size image (the length of ``pos_embed`` minus CLS)."""
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints and metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """Inverse of :meth:`to_dict`, ignoring unknown keys."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def vit_config(arch: str, patch_size: int = 16, **overrides: Any) -> ViTConfig:
    """Config of a named architecture (``vit_tiny``, ``vit_small``, ``vit_base``).

    Raises:
        ValueError: Unknown architecture name.
    """
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    embed_dim, depth, num_heads = ARCHITECTURES[arch]
    params: dict[str, Any] = {
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "arch": arch,
    }
    params.update(overrides)
    return ViTConfig(**params)


def arch_name(embed_dim: int, depth: int, num_heads: int) -> str:
    """The factory name matching these sizes, or "custom"."""
    for name, sizes in ARCHITECTURES.items():
        if sizes == (embed_dim, depth, num_heads):
            return name
    return "custom"


def _spatial_size(x: Tensor) -> tuple[Tensor, Tensor] | tuple[int, int]:
    """Height and width of an NCHW tensor.

    0-d int64 tensors while tracing (a Shape op, so the ONNX graph stays dynamic in height and
    width); Python ints otherwise, which lets the position-embedding matrices be cached.
    """
    tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
    if tracing or torch.onnx.is_in_onnx_export():
        shape = torch._shape_as_tensor(x)  # (4,), traced as a Shape op
        return shape[2], shape[3]
    return int(x.shape[2]), int(x.shape[3])


class VisionTransformer(nn.Module):
    """DINO ViT backbone (no classification head).

    Args:
        config: Architecture.
        drop_path_rate: Stochastic depth rate, rising linearly per block from 0 (student: 0.1).
    """

    def __init__(self, config: ViTConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.embed_dim))
        rates = torch.linspace(0, drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                norm_eps=config.norm_eps,
                drop_path_rate=rate,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        # Keep probabilities on each device, per set of rates (a cache, not a buffer: nothing to
        # save or broadcast). The rates themselves live in each block's DropPath.
        self._keep_cache: dict[tuple[torch.device, tuple[float, ...]], Tensor] = {}
        self.reset_parameters()
        self._cache_keep_probs()

    def _drop_blocks(self) -> tuple[list[int], tuple[float, ...]]:
        """Blocks with stochastic depth and the keep probability of each of their two branches
        (attention, MLP), read from the blocks' :class:`~models.layers.DropPath`."""
        rates = [cast(Block, block).drop_path.drop_prob for block in self.blocks]
        indices = [i for i, rate in enumerate(rates) if rate > 0]
        return indices, tuple(1.0 - rates[i] for i in indices for _ in range(2))

    def _keep_tensor(self, keep: tuple[float, ...], device: torch.device) -> Tensor:
        key = (device, keep)
        cached = self._keep_cache.get(key)
        if cached is None:
            cached = torch.tensor(keep, dtype=torch.float32).to(device)
            self._keep_cache[key] = cached
        return cached

    def _cache_keep_probs(self) -> None:
        """Put the keep probabilities on the parameters' device ahead of the first forward (no
        copy per forward, and nothing for ``torch.compile`` to see change)."""
        indices, keep = self._drop_blocks()
        if indices:
            self._keep_tensor(keep, self.cls_token.device)

    def _apply(self, fn: Any, recurse: bool = True) -> VisionTransformer:
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()`` ...), then the cache follows."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._cache_keep_probs()
        return self

    def reset_parameters(self) -> None:
        """Reference init: trunc-normal(0.02) for Linear/pos/cls, LayerNorm (1, 0), conv default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def last_block(self) -> Block:
        """The final block (the one whose attention is exported)."""
        return cast(Block, self.blocks[-1])

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Patch tokens with CLS prepended and position embeddings added: ``[B, 1 + N, D]``."""
        height, width = _spatial_size(x)
        tokens = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat((cls, tokens), dim=1)  # (B, 1 + N, D)
        return tokens + interpolate_pos_embed(self.pos_embed, height, width, self.patch_size)

    def _draw_scales(self, batch: int, device: torch.device) -> tuple[list[int], Tensor] | None:
        """Blocks with stochastic depth and ``[2 * blocks, B]`` scales for their branches
        (attention, MLP, next block ...), drawn in one go; None outside training or without."""
        indices, keep = self._drop_blocks()
        if not (self.training and indices):
            return None
        return indices, drop_path_scales(self._keep_tensor(keep, device), batch)  # (J, B)

    def _per_block(
        self, drawn: tuple[list[int], Tensor] | None
    ) -> list[tuple[Tensor, Tensor] | None]:
        """Per block, its (attention, MLP) scales, or None for a block without stochastic depth."""
        per_block: list[tuple[Tensor, Tensor] | None] = [None] * len(self.blocks)
        if drawn is not None:
            indices, scales = drawn
            for k, index in enumerate(indices):
                per_block[index] = (scales[2 * k], scales[2 * k + 1])
        return per_block

    def _residual_scales(
        self, batch: int, device: torch.device
    ) -> list[tuple[Tensor, Tensor] | None]:
        """Per block, the ``[B, 1, 1]`` scales of its two branches (None: no stochastic depth)."""
        drawn = self._draw_scales(batch, device)
        if drawn is None:
            return self._per_block(None)
        indices, scales = drawn
        return self._per_block((indices, scales[:, :, None, None]))  # (J, B, 1, 1)

    def _packed_residual_scales(
        self, groups: Sequence[tuple[int, int]], device: torch.device
    ) -> list[tuple[Tensor, Tensor] | None]:
        """Per block, ``[R, 1]`` scales for packed rows: each sequence's on all its tokens."""
        drawn = self._draw_scales(sum(batch for batch, _ in groups), device)
        if drawn is None:
            return self._per_block(None)
        indices, scales = drawn  # (J, sum B)
        parts, start = [], 0
        for batch, tokens in groups:
            part = scales[:, start : start + batch, None].expand(-1, batch, tokens)
            parts.append(part.reshape(len(scales), batch * tokens))  # (J, B * N)
            start += batch
        return self._per_block((indices, torch.cat(parts, dim=1)[:, :, None]))  # (J, R, 1)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """CLS embedding after the final norm, ``[B, D]`` (the reference ``forward``).

        In training, every block's stochastic depth is drawn in one go (:func:`drop_path_scales`)
        and applied as one multiply per residual branch.

        Args:
            x: ``[B, 3, H, W]``, or a sequence of such batches (sizes may differ between
                them, e.g. the global and the local crops): these run as one packed pass
                (:meth:`forward_packed`) and their embeddings come back concatenated.
        """
        if not isinstance(x, Tensor):
            return self.forward_packed(list(x))
        tokens = self.prepare_tokens(x)
        residual_scales = self._residual_scales(tokens.shape[0], tokens.device)
        for block, scales in zip(self.blocks, residual_scales, strict=True):
            tokens = block(tokens, scales)
        out: Tensor = self.norm(tokens[:, 0])  # the norm is per token: only CLS is needed
        return out

    def forward_packed(self, batches: list[Tensor]) -> Tensor:
        """CLS embeddings of several batches in one pass: ``[sum B_g, D]``, batch by batch.

        The tokens of all batches are stacked as rows of one ``[R, D]`` matrix, so each linear
        layer, norm and activation runs once (and its weights get one gradient) instead of once
        per batch; attention stays within each sequence. Per sequence the result is what
        :meth:`forward` computes on its batch alone.

        Raises:
            ValueError: No batch.
        """
        if not batches:
            raise ValueError("forward_packed needs at least one batch")
        tokens = [self.prepare_tokens(batch) for batch in batches]  # each (B_g, N_g, D)
        groups = [(int(t.shape[0]), int(t.shape[1])) for t in tokens]
        x = torch.cat([t.reshape(-1, self.embed_dim) for t in tokens])  # (R, D)
        residual_scales = self._packed_residual_scales(groups, x.device)
        for block, scales in zip(self.blocks, residual_scales, strict=True):
            x = block(x, scales, groups)
        cls_rows, start = [], 0
        for batch, count in groups:
            cls_rows.append(x[start : start + batch * count].view(batch, count, -1)[:, 0])
            start += batch * count
        out: Tensor = self.norm(torch.cat(cls_rows))  # (sum B, D)
        return out

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All contract outputs in one pass.

        Every block but the last uses fused attention; the last computes the softmax explicitly.

        Returns:
            ``cls_embedding [B, D]``, ``patch_features [B, N, D]`` (after the final norm,
            row-major over H/p rows and W/p columns) and ``attention_maps [B, heads, N]`` (the
            last block's CLS-query attention over the patch keys).
        """
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        x, attn = self.last_block.forward_with_attention(x)  # attn: (B, h, 1 + N, 1 + N)
        x = self.norm(x)
        return x[:, 0], x[:, 1:], attn[:, :, 0, 1:]

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Reference API: last block's attention ``[B, heads, 1 + N, 1 + N]``."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.last_block
        _, attn = last.attn.forward_with_attention(last.norm1(x))
        return attn

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Reference API: outputs of the last ``n`` blocks, each after the final norm."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.norm(x))
        return outputs


def build_vit(config: ViTConfig, drop_path_rate: float = 0.0) -> VisionTransformer:
    """Construct a :class:`VisionTransformer` from its config."""
    return VisionTransformer(config, drop_path_rate=drop_path_rate)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def grid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an input in pixels."""
    return height // patch_size, width // patch_size


def infer_num_heads(embed_dim: int) -> int:
    """Default head count of the released models: ``embed_dim / 64``.

    Raises:
        ValueError: ``embed_dim`` is not a multiple of 64, so the head count must be given.
    """
    if embed_dim % HEAD_DIM:
        raise ValueError(
            f"cannot infer num_heads for embed_dim {embed_dim} (not a multiple of {HEAD_DIM}); "
            "pass it explicitly (--num-heads)"
        )
    return embed_dim // HEAD_DIM
