"""AsyLoRA: ΔW = s·B·A with A or B frozen; formula, step 0, which factor trains, merge/export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError


def build(freeze: str, init_weights: bool = True) -> tuple[nn.Sequential, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 7))
    mms.inject(net, mms.config_for("asylora", rank=3, alpha=6.0, targets=["0"], freeze=freeze, init_weights=init_weights))
    return net, net[0].adapters["default"]


@pytest.mark.parametrize("freeze", ["A", "B"])
def test_forward_equals_formula(freeze):
    net, ad = build(freeze, init_weights=False)
    x = torch.randn(4, 5, 10)
    ref = x @ (ad.base_weight() + 2.0 * ad.lora_B @ ad.lora_A).T + ad.base_bias()
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("freeze", ["A", "B"])
def test_step0_is_base_and_only_the_other_factor_trains(freeze):
    net, ad = build(freeze)
    x = torch.randn(6, 10)
    assert torch.equal(net(x), net[0].base_layer(x))
    frozen, trained = (ad.lora_A, ad.lora_B) if freeze == "A" else (ad.lora_B, ad.lora_A)
    assert not frozen.requires_grad and trained.requires_grad
    assert frozen.abs().sum() > 0  # a zero frozen factor would stop the other's gradient
    before = frozen.detach().clone()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(x).square().sum().backward()
    assert trained.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(frozen, before)
    assert not torch.equal(net(x), net[0].base_layer(x))


@pytest.mark.parametrize("freeze", ["A", "B"])
def test_merge_and_export_equal_forward(freeze):
    net, ad = build(freeze, init_weights=False)
    x = torch.randn(3, 10)
    y = net(x)
    down, up, scaling = mms.lora_factors(net)["0"]
    torch.testing.assert_close(scaling * up @ down, ad.delta_weight())
    mms.merge(net)
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)


def test_bad_freeze_is_a_config_error():
    with pytest.raises(ConfigError, match="freeze"):
        mms.config_for("asylora", freeze="AB")
