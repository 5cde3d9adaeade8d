"""Parameter groups, per-tensor clipping, last-layer freeze, LARS and EMA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.vit import VisionTransformer, ViTConfig
from training.ema import ParameterEMA
from training.heads import DINOHead
from training.multicrop import MultiCropWrapper
from training.optim import (
    LARS,
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
)


def tiny_student(norm_last_layer=True):
    torch.manual_seed(0)
    config = ViTConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32, arch="custom")
    head = DINOHead(32, 16, norm_last_layer=norm_last_layer, hidden_dim=24, bottleneck_dim=8)
    return MultiCropWrapper(VisionTransformer(config, drop_path_rate=0.1), head)


def test_param_groups_follow_reference():
    model = tiny_student(norm_last_layer=False)
    regularized, not_regularized = get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    reg = {names[id(p)] for p in regularized["params"]}
    noreg = {names[id(p)] for p in not_regularized["params"]}
    assert not_regularized["weight_decay"] == 0.0
    assert {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.weight_g"} <= reg
    assert "backbone.blocks.0.attn.qkv.weight" in reg
    assert "backbone.blocks.0.norm1.weight" in noreg and "backbone.norm.bias" in noreg
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in noreg)
    assert reg | noreg == {n for n, _ in model.named_parameters()}
    frozen = tiny_student(norm_last_layer=True)
    all_names = set()
    for group in get_params_groups(frozen):
        all_names |= {
            n for n, p in frozen.named_parameters() if any(p is q for q in group["params"])
        }
    assert "head.last_layer.weight_g" not in all_names


def test_per_tensor_clipping_matches_reference_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    grads = [
        torch.randn_like(p) * s for p, s in zip(model.parameters(), [10, 0.01, 5, 0.1], strict=True)
    ]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    norms = clip_gradients(model, 3.0)
    for p, g, n in zip(model.parameters(), grads, norms, strict=True):
        ref_norm = g.norm(2)
        coef = 3.0 / (ref_norm + 1e-6)
        expected = g * coef if coef < 1 else g
        assert torch.equal(p.grad, expected)  # bit for bit: the same float32 arithmetic
        torch.testing.assert_close(n, ref_norm)
    # Not a global clip: the small tensors are untouched.
    assert torch.equal(list(model.parameters())[1].grad, grads[1])


def test_freeze_last_layer_sets_grad_none_and_adamw_skips_it():
    model = tiny_student(norm_last_layer=False)
    optimizer = build_optimizer("adamw", get_params_groups(model))
    out = model([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)])
    out.sum().backward()
    cancel_gradients_last_layer(0, model, freeze_last_layer=1)
    last = [p for n, p in model.named_parameters() if "last_layer" in n]
    before = [p.detach().clone() for p in last]
    assert all(p.grad is None for p in last)
    other = model.backbone.cls_token
    assert other.grad is not None
    optimizer.step()
    for p, b in zip(last, before, strict=True):
        assert torch.equal(p, b)
        assert p not in optimizer.state or not optimizer.state[p]
    assert optimizer.state[other]["step"] == 1
    # From epoch 1 on the gradients are kept.
    out = model([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)])
    out.sum().backward()
    cancel_gradients_last_layer(1, model, freeze_last_layer=1)
    assert all(p.grad is not None for p in last)


def test_lars_step_closed_form():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([{"params": [p]}, {"params": [b], "weight_decay": 0.0}], weight_decay=0.1, eta=0.001)
    for g in opt.param_groups:
        g["lr"] = 0.5
    opt.step()
    update = torch.tensor([[0.3, 1.4]])
    q = 0.001 * 5.0 / update.norm()
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * q * update)
    torch.testing.assert_close(b.detach(), torch.tensor([0.75, 1.75]))  # 1-D: no wd, no ratio


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", [{"params": [nn.Parameter(torch.zeros(1))]}])


def test_ema_matches_per_parameter_loop():
    student, teacher = tiny_student(), tiny_student()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = {
        n: 0.99 * t.detach() + (1 - 0.99) * s.detach()
        for (n, t), s in zip(teacher.named_parameters(), student.parameters(), strict=True)
    }
    ParameterEMA(student, teacher).update(0.99)
    for n, t in teacher.named_parameters():
        torch.testing.assert_close(t.detach(), expected[n], rtol=1e-6, atol=1e-7)
    assert "head.last_layer.weight_g" in dict(teacher.named_parameters())


def test_ema_rejects_mismatched_networks():
    with pytest.raises(ValueError, match="differ"):
        ParameterEMA(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
