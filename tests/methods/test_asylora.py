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


def test_default_a_is_orthonormal_and_frozen():
    """AsyLoRA's code freezes a random orthonormal A (first right singular vectors of a random matrix): A·Aᵀ = I."""
    _, ad = build("A")
    assert ad.config.a_init == "orthonormal"
    torch.testing.assert_close(ad.lora_A @ ad.lora_A.T, torch.eye(3), atol=1e-5, rtol=0)
    assert not ad.lora_A.requires_grad


def test_orthonormal_a_with_more_rows_than_inputs_comes_in_orthonormal_blocks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8))
    mms.inject(net, mms.config_for("asylora", rank=4, targets=["0"]))
    a = net[0].adapters["default"].lora_A.detach()
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)  # rank = in: one full orthonormal block
    from mm_subspace.methods.asylora import orthonormal_rows_

    torch.manual_seed(1)
    rows = orthonormal_rows_(torch.empty(10, 4))
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(10))
    for block in (rows[:4], rows[4:8], rows[8:]):
        torch.testing.assert_close(block @ block.T, torch.eye(block.shape[0]), atol=1e-5, rtol=0)


def test_kaiming_a_is_the_previous_init_bit_for_bit():
    """a_init='kaiming' draws A exactly as before the option existed: LoRA's kaiming_uniform_(a=√5) after the base."""
    _, ad = build("A")
    torch.manual_seed(0)
    nn.Linear(10, 7)
    expect = nn.init.kaiming_uniform_(torch.empty(3, 10), a=5 ** 0.5)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 7))
    mms.inject(net, mms.config_for("asylora", rank=3, alpha=6.0, targets=["0"], a_init="kaiming"))
    kai = net[0].adapters["default"]
    assert torch.equal(kai.lora_A, expect)
    assert 0.4 < kai.lora_A.norm(dim=1).mean() < 0.75  # U(−1/√in, 1/√in): row norm ≈ √(in · 1/(3·in)) = 0.58, not 1
    assert not torch.equal(ad.lora_A, expect)


def test_configs_saved_without_a_init_load_as_kaiming():
    cfg = mms.config_for("asylora", rank=3, targets=["0"]).to_dict()
    del cfg["a_init"]
    assert mms.AdapterConfig.from_dict(cfg).a_init == "kaiming"
    with pytest.raises(ConfigError, match="a_init"):
        mms.config_for("asylora", a_init="uniform")


def test_stored_minus_trainable_is_the_frozen_factor():
    for freeze in ("A", "B"):
        net, ad = build(freeze)
        counts = mms.parameter_counts(net)
        frozen, trained = (ad.lora_A, ad.lora_B) if freeze == "A" else (ad.lora_B, ad.lora_A)
        assert counts.trainable == trained.numel()
        assert counts.stored - counts.trainable == frozen.numel()
