from __future__ import annotations

import pytest
import torch

from models.layers import drop_path_scales
from models.vit import VisionTransformer, ViTConfig, count_parameters, vit_config
from tests.models import reference_vit as ref

# Parameter counts of the reference factories (dino-reference.md, section 2.1).
REFERENCE_PARAMS = {
    ("vit_tiny", 16): 5_524_416,
    ("vit_tiny", 8): 5_526_720,
    ("vit_small", 16): 21_665_664,
    ("vit_small", 8): 21_670_272,
    ("vit_base", 16): 85_798_656,
    ("vit_base", 8): 85_807_872,
}


@pytest.mark.parametrize(("arch", "patch"), sorted(REFERENCE_PARAMS))
def test_factory_parameter_counts_match_reference(arch: str, patch: int) -> None:
    with torch.device("meta"):
        model = VisionTransformer(vit_config(arch, patch))
    assert count_parameters(model) == REFERENCE_PARAMS[(arch, patch)]


def test_initialisation_follows_the_reference() -> None:
    # dino-reference.md, section 2.4: trunc-normal(0.02) for pos_embed, cls_token and every
    # Linear weight (PyTorch's default Linear init would give std 1/sqrt(3 * fan_in) = 0.029),
    # zero Linear biases, LayerNorm 1/0, and the patch Conv2d left at PyTorch's default
    # kaiming-uniform (bound 1/sqrt(fan_in), std 1/sqrt(3 * fan_in) = 0.0208 for 3*16*16).
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("vit_small", 16))
    for name in ("pos_embed", "cls_token"):
        values = getattr(model, name)
        assert abs(values.std().item() - 0.02) < (0.001 if name == "pos_embed" else 0.003), name
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 12  # qkv, proj, fc1, fc2 per block
    for module in linears:
        assert abs(module.weight.std().item() - 0.02) < 0.0006
        assert module.weight.abs().max() < 0.2  # a normal, not a wide uniform
        assert module.bias is not None and torch.all(module.bias == 0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-6 for m in norms)
    for module in norms:
        assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    conv = model.patch_embed.proj
    fan_in = 3 * 16 * 16
    assert conv.weight.abs().max() <= fan_in**-0.5
    assert abs(conv.weight.std().item() - (3 * fan_in) ** -0.5) < 0.0005
    assert conv.bias is not None and conv.bias.abs().max() <= fan_in**-0.5
    assert conv.bias.abs().max() > 0  # not zeroed like the Linear biases


def test_vit_small_state_dict_has_official_names_and_shapes() -> None:
    with torch.device("meta"):
        sd = VisionTransformer(vit_config("vit_small", 16)).state_dict()
    assert len(sd) == 150
    expected = {
        "cls_token": (1, 1, 384),
        "pos_embed": (1, 197, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16),
        "blocks.11.attn.qkv.weight": (1152, 384),
        "blocks.11.attn.qkv.bias": (1152,),
        "blocks.0.mlp.fc1.weight": (1536, 384),
        "blocks.0.mlp.fc2.weight": (384, 1536),
        "norm.bias": (384,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    released = VisionTransformer.__init__  # released settings: qkv bias and eps 1e-6
    assert released is not None
    config = vit_config("vit_small", 16)
    assert config.qkv_bias and config.norm_eps == 1e-6


def test_shapes_and_finite(tiny_vit: VisionTransformer) -> None:
    x = torch.randn(3, 3, 48, 40)
    cls, patches, attn = tiny_vit.forward_features(x)
    assert cls.shape == (3, 32)
    assert patches.shape == (3, 6 * 5, 32)
    assert attn.shape == (3, 2, 30)
    for t in (cls, patches, attn):
        assert torch.isfinite(t).all()
    # attention rows are softmax rows over 1 + N keys: the patch part sums to < 1
    assert (attn.sum(-1) < 1).all() and (attn >= 0).all()
    torch.testing.assert_close(tiny_vit(x), cls, rtol=1e-5, atol=1e-5)


def test_every_parameter_receives_a_gradient(tiny_vit_config: ViTConfig) -> None:
    torch.manual_seed(1)
    model = VisionTransformer(tiny_vit_config, drop_path_rate=0.1).train()
    cls, patches, attn = model.forward_features(torch.randn(2, 3, 32, 40))
    (cls.sum() + patches.sum() + attn.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_drop_path_is_identity_in_eval_and_scales_in_train(tiny_vit_config: ViTConfig) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny_vit_config, drop_path_rate=0.5)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.5])  # linspace(0, rate, depth)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(4)
    b = model(x)
    assert not torch.allclose(a, b)


def _reference_outputs(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    p, h = model.patch_size, model.num_heads
    cls = ref.forward(sd, x, p, h)
    tokens = ref.get_intermediate_layers(sd, x, p, h)
    attn = ref.get_last_selfattention(sd, x, p, h)
    return cls, tokens[:, 1:], attn[:, :, 0, 1:]


@pytest.mark.parametrize(
    ("height", "width"), [(224, 224), (320, 256), (224, 230), (96, 96), (227, 301), (100, 60)]
)
def test_vit_small_matches_reference_forward(height: int, width: int) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("vit_small", 16)).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = _reference_outputs(model, x)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 40), (24, 56), (40, 32)])
def test_tiny_matches_reference_forward_non_square(
    tiny_vit: VisionTransformer, height: int, width: int
) -> None:
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        ours = tiny_vit.forward_features(x)
        theirs = _reference_outputs(tiny_vit, x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_reference_methods_agree(tiny_vit: VisionTransformer) -> None:
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        cls, patches, attn = tiny_vit.forward_features(x)
        last = tiny_vit.get_intermediate_layers(x, n=1)[0]
        full_attn = tiny_vit.get_last_selfattention(x)
    torch.testing.assert_close(last[:, 1:], patches, rtol=0, atol=1e-5)
    torch.testing.assert_close(full_attn[:, :, 0, 1:], attn, rtol=0, atol=1e-6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple"):
        ViTConfig(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="unknown arch"):
        vit_config("vit_huge")
    cfg = vit_config("deit_small", 8)
    assert (cfg.arch, cfg.embed_dim, cfg.num_heads, cfg.patch_size) == ("vit_small", 384, 6, 8)
    assert ViTConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg


# ---------------------------------------------------------------------------------------------
# Training fast paths: stochastic depth drawn once per forward, packed multi-resolution batches.


def test_drop_path_scales_have_the_reference_distribution() -> None:
    """floor(keep + U) / keep: 0 with probability 1 - keep, else exactly 1 / keep."""
    torch.manual_seed(0)
    keep = torch.tensor([0.25, 0.9, 1.0])
    scales = drop_path_scales(keep, 40_000)
    assert scales.shape == (3, 40_000) and scales.dtype == torch.float32
    for j, p in enumerate(keep.tolist()):
        values = scales[j].flatten()
        kept = values != 0
        assert values[kept].unique().tolist() == [(1 / keep[j : j + 1]).item()]  # float32
        sigma = (p * (1 - p) / len(values)) ** 0.5
        assert abs(kept.float().mean().item() - p) <= 5 * sigma + 1e-12


def test_one_multiply_equals_the_reference_drop_path(tiny_vit_config: ViTConfig) -> None:
    """``x + y * (mask / keep)`` is the reference's ``x + y.div(keep) * mask``."""
    torch.manual_seed(0)
    block = VisionTransformer(tiny_vit_config, drop_path_rate=0.5).blocks[1].train()
    x = torch.randn(4, 5, 32)
    keep = 1 - block.drop_path.drop_prob
    masks = torch.tensor([[1.0], [0.0], [1.0], [0.0]])[:, :, None]  # (B, 1, 1), 2 of 4 dropped
    got = block(x, (masks / keep, masks.flip(0) / keep))
    y = x + block.attn(block.norm1(x)).div(keep) * masks
    want = y + block.mlp(block.norm2(y)).div(keep) * masks.flip(0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(5)
    return [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 16, 16), torch.randn(2, 3, 24, 40)]


def test_packed_batches_give_each_batch_its_own_forward(tiny_vit_config: ViTConfig) -> None:
    batches = _batches()
    torch.manual_seed(0)
    model = VisionTransformer(tiny_vit_config)  # no stochastic depth: comparable in train mode
    packed = model(batches)
    separate = torch.cat([model(b) for b in batches])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-6)
    assert packed.shape == (10, 32)

    grads = []
    for out in (packed, separate):
        model.zero_grad()
        (out**2).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def _deep_config() -> ViTConfig:
    """Four blocks: three with stochastic depth, each with its own rate."""
    return ViTConfig(patch_size=8, embed_dim=32, depth=4, num_heads=2, img_size=32)


def _reference_drop_path_forward(
    model: VisionTransformer, x: torch.Tensor, draws: torch.Tensor
) -> torch.Tensor:
    """The reference's forward with given 0/1 masks ``[2 * blocks with drop path, B]``: each
    branch adds ``y.div(keep_prob) * mask`` (DINO's ``drop_path``), the norm covers all tokens."""
    x = model.prepare_tokens(x)
    k = 0
    for block in model.blocks:
        keep = 1 - block.drop_path.drop_prob
        if keep == 1:
            x = x + block.attn(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
            continue
        mask_attn, mask_mlp = (draws[k + i][:, None, None] for i in (0, 1))  # (B, 1, 1)
        x = x + block.attn(block.norm1(x)).div(keep) * mask_attn
        x = x + block.mlp(block.norm2(x)).div(keep) * mask_mlp
        k += 2
    return model.norm(x)[:, 0]


def test_stochastic_depth_is_drawn_per_sample_block_and_branch() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(_deep_config(), drop_path_rate=0.6).train()
    rates = [block.drop_path.drop_prob for block in model.blocks]
    indices, keep = model._drop_blocks()
    assert indices == [1, 2, 3] and keep == pytest.approx([1 - r for r in rates[1:] for _ in "ab"])

    # The keep probability of each row goes with its block: 20,000 draws per row.
    drawn = model._draw_scales(20_000, torch.device("cpu"))
    assert drawn is not None
    kept = (drawn[1] != 0).float().mean(dim=1)
    torch.testing.assert_close(kept, torch.tensor(keep, dtype=torch.float32), atol=0.02, rtol=0)

    # The scales a forward hands to the blocks: per sample, different per block and branch.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[1]) if args[1] else None)
        for block in model.blocks
    ]
    x = torch.randn(1, 3, 32, 32).expand(64, -1, -1, -1)  # 64 identical images
    out = model(x)
    assert len(seen) == 3  # blocks 1-3; block 0 has no stochastic depth
    flat = torch.cat([scale.flatten()[None] for pair in seen for scale in pair])  # (6, 64)
    assert all(len(row.unique()) == 2 for row in flat)  # kept and dropped samples in every row
    assert len({tuple(row.tolist()) for row in (flat != 0)}) == 6  # six distinct masks
    assert len(out.unique(dim=0)) > 1  # identical inputs, different depths
    for hook in hooks:
        hook.remove()

    # The output is the reference's with those masks.
    masks = (flat != 0).float()
    torch.testing.assert_close(out, _reference_drop_path_forward(model, x, masks))


def test_packed_stochastic_depth_is_drawn_per_sequence() -> None:
    """Packed rows share their sequence's draw; the result is the reference forward of each
    batch with those draws."""
    batches = _batches()
    torch.manual_seed(0)
    model = VisionTransformer(_deep_config(), drop_path_rate=0.6).train()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[1]) if args[1] else None)
        for block in model.blocks
    ]
    packed = model(batches)  # hooks fire on the packed path too
    for hook in hooks:
        hook.remove()
    assert len(seen) == 3

    groups = [(len(b), 1 + (b.shape[2] // 8) * (b.shape[3] // 8)) for b in batches]
    per_sample = []
    for pair in seen:
        for scale in pair:  # (R, 1): constant over each sequence's rows
            rows = list(scale.flatten().split([b * n for b, n in groups]))
            for part, (b, n) in zip(rows, groups, strict=True):
                assert (part.view(b, n) == part.view(b, n)[:, :1]).all()
            per_sample.append(
                torch.cat([p.view(b, n)[:, 0] for p, (b, n) in zip(rows, groups, strict=True)])
            )
    masks = (torch.stack(per_sample) != 0).float()  # (6, 10)
    expected, start = [], 0
    for batch in batches:
        expected.append(
            _reference_drop_path_forward(model, batch, masks[:, start : start + len(batch)])
        )
        start += len(batch)
    torch.testing.assert_close(packed, torch.cat(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_with_stochastic_depth(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(_deep_config(), drop_path_rate=0.3).to(dtype).train()
    out = model(torch.randn(4, 3, 32, 32, dtype=dtype))
    packed = model([torch.randn(2, 3, 32, 32, dtype=dtype), torch.randn(2, 3, 16, 16, dtype=dtype)])
    assert out.dtype == packed.dtype == dtype
    (out.float().sum() + packed.float().sum()).backward()


def test_packed_rows_refuse_to_draw_per_row() -> None:
    model = VisionTransformer(_deep_config(), drop_path_rate=0.3).train()
    with pytest.raises(ValueError, match="per sequence"):
        model.blocks[1](torch.randn(10, 32), None, [(2, 5)])
    with pytest.raises(ValueError, match="at least one batch"):
        model([])
