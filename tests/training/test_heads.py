"""DINOHead: reference structure and the official checkpoint key names."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.heads import DINOHead


def official_head_state(in_dim, out_dim, use_bn=False, hidden=24, bottleneck=8):
    """A state dict with the official names and shapes (old weight_norm g/v)."""
    g = torch.Generator().manual_seed(3)
    state = {}
    linears = ["mlp.0", "mlp.3", "mlp.6"] if use_bn else ["mlp.0", "mlp.2", "mlp.4"]
    shapes = [(hidden, in_dim), (hidden, hidden), (bottleneck, hidden)]
    for name, shape in zip(linears, shapes, strict=True):
        state[f"{name}.weight"] = torch.randn(shape, generator=g)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    if use_bn:
        for name in ("mlp.1", "mlp.4"):
            state[f"{name}.weight"] = torch.rand(hidden, generator=g)
            state[f"{name}.bias"] = torch.randn(hidden, generator=g)
            state[f"{name}.running_mean"] = torch.randn(hidden, generator=g)
            state[f"{name}.running_var"] = torch.rand(hidden, generator=g) + 0.5
            state[f"{name}.num_batches_tracked"] = torch.tensor(7)
    state["last_layer.weight_g"] = torch.rand(out_dim, 1, generator=g) + 0.5
    state["last_layer.weight_v"] = torch.randn(out_dim, bottleneck, generator=g)
    return state


def test_loads_official_keys_and_computes_reference_forward():
    state = official_head_state(16, 12)
    head = DINOHead(16, 12, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(state, strict=True)
    assert list(head.state_dict()) == list(state)
    x = torch.randn(5, 16)
    h = F.gelu(x @ state["mlp.0.weight"].T + state["mlp.0.bias"])
    h = F.gelu(h @ state["mlp.2.weight"].T + state["mlp.2.bias"])
    h = h @ state["mlp.4.weight"].T + state["mlp.4.bias"]
    h = F.normalize(h, dim=-1)
    v, g = state["last_layer.weight_v"], state["last_layer.weight_g"]
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)


def test_loads_official_bn_keys():
    head = DINOHead(16, 12, use_bn=True, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(official_head_state(16, 12, use_bn=True), strict=True)


def test_loads_new_style_parametrization_keys():
    state = official_head_state(16, 12)
    new = dict(state)
    new["last_layer.parametrizations.weight.original0"] = new.pop("last_layer.weight_g")
    new["last_layer.parametrizations.weight.original1"] = new.pop("last_layer.weight_v")
    head = DINOHead(16, 12, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(new, strict=True)
    torch.testing.assert_close(head.last_layer.weight_g, state["last_layer.weight_g"])


def test_default_init_and_frozen_g():
    torch.manual_seed(0)
    head = DINOHead(384, 1000)
    assert head.last_layer.weight_g.requires_grad is False
    assert torch.all(head.last_layer.weight_g == 1)
    bound = 1 / 256**0.5  # PyTorch's default Linear init, not trunc-normal
    assert head.last_layer.weight_v.abs().max() <= bound
    assert head.last_layer.weight_v.std() > 0.03  # trunc-normal(0.02) would be ~0.02
    rows = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(1000))
    out = head(torch.randn(4, 384))
    assert out.abs().max() <= 1 + 1e-5  # cosine similarities
    assert DINOHead(8, 4, norm_last_layer=False).last_layer.weight_g.requires_grad
