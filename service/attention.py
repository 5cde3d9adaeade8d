"""What one image's attention matrix costs, and the refusal of an image over the budget."""

from __future__ import annotations

from service.errors import TooManyTokensError


def attention_bytes(*, width: int, height: int, patch_size: int, num_heads: int) -> int:
    """Bytes of one image's float32 attention matrix in one block (``heads x N x N``).

    Args:
        width: Processed width (a patch multiple).
        height: Processed height (a patch multiple).
        patch_size: The model's patch size.
        num_heads: The model's attention heads.

    Returns:
        ``num_heads * N**2 * 4`` with ``N`` = patches + 1 (the CLS token).
    """
    tokens = (width // patch_size) * (height // patch_size) + 1
    return num_heads * tokens * tokens * 4


def check_attention_budget(
    size: tuple[int, int],
    *,
    patch_size: int,
    num_heads: int,
    budget: int,
    index: int | None,
    center_side: int | None = None,
) -> None:
    """Refuse an image whose attention matrix alone exceeds ``budget``.

    Args:
        size: Processed ``(width, height)``.
        patch_size: The model's patch size.
        num_heads: The model's attention heads.
        budget: ``DINO_MAX_BATCH_ATTENTION_BYTES``.
        index: The image's position in the request (None: every image).
        center_side: With ``crop=none``, the side ``crop=center`` would use; the message
            suggests it only when that size fits the budget.

    Raises:
        TooManyTokensError: Its cost is over the budget.
    """

    def cost_of(width: int, height: int) -> int:
        return attention_bytes(
            width=width, height=height, patch_size=patch_size, num_heads=num_heads
        )

    width, height = size
    cost = cost_of(width, height)
    if cost > budget:
        tokens = (width // patch_size) * (height // patch_size) + 1
        center_fits = center_side is not None and cost_of(center_side, center_side) <= budget
        raise TooManyTokensError(
            f"at {width}x{height} pixels the image has {tokens} tokens and needs "
            f"{cost / 2**20:.1f} MiB of attention memory, over the limit of "
            f"{budget / 2**20:.1f} MiB (DINO_MAX_BATCH_ATTENTION_BYTES); ask for a smaller "
            + ("resolution or crop=center" if center_fits else "resolution"),
            index=index,
        )
