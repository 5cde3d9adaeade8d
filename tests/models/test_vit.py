from __future__ import annotations

import pytest
import torch

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
