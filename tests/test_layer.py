"""The A·M·B layer: LoRA, MoSLoRA and TS-Mixing against their closed forms (MoSLoRA Eq. 5-7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10))


def _adapter(model: nn.Module, name: str = "0", adapter: str = "default"):
    return model.get_submodule(name).adapters[adapter]


def _randomise(model: nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(model):
            for p in adapter.parameters():
                p.normal_()


def test_moslora_identity_mixer_equals_lora_exactly():
    """MoSLoRA Eq. (5): LoRA is the special case with the fixed identity mixer."""
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    lora, mos = _net(), _net()
    mms.inject(lora, mms.LoraConfig(rank=4, alpha=8, targets=["0", "2"]))
    mms.inject(mos, mms.MoSLoRAConfig(rank=4, alpha=8, mixer_init="identity", targets=["0", "2"]))
    _randomise(lora)
    for name in ("0", "2"):
        a_l, a_m = _adapter(lora, name), _adapter(mos, name)
        with torch.no_grad():
            a_m.lora_A.copy_(a_l.lora_A)
            a_m.lora_B.copy_(a_l.lora_B)
    assert torch.equal(lora(x), mos(x))


def test_moslora_forward_is_scaled_b_m_a():
    torch.manual_seed(0)
    layer = nn.Linear(12, 16)
    model = nn.Sequential(layer)
    mms.inject(model, mms.MoSLoRAConfig(rank=4, alpha=6, targets=["0"], init_weights=False))
    a = _adapter(model)
    x = torch.randn(3, 7, 12)
    expected = layer(x) + (6 / 4) * x @ a.lora_A.T @ a.mixer.T @ a.lora_B.T
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(a.delta_weight(), 1.5 * a.lora_B @ a.mixer @ a.lora_A)


def test_zero_mixer_never_trains_and_other_inits_do():
    """MoSLoRA Appendix C: with B = 0 and M = 0, A, M and B all get zero gradient."""
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    for init in ("zero", "kaiming_uniform", "orthogonal", "identity", "normal"):
        model = _net()
        mms.inject(model, mms.MoSLoRAConfig(rank=4, mixer_init=init, targets=["0"]))
        model(x).pow(2).sum().backward()
        a = _adapter(model)
        grads = [a.lora_A.grad, a.mixer.grad, a.lora_B.grad]
        if init == "zero":
            assert all(torch.count_nonzero(g) == 0 for g in grads)
        else:
            # B starts at 0, so only B receives gradient at step 0 — but it must be non-zero
            assert torch.count_nonzero(a.lora_B.grad) > 0, init


def test_mixer_inits_have_the_documented_structure():
    torch.manual_seed(0)
    mixers = {}
    for init in ("orthogonal", "identity", "zero"):
        model = _net()
        mms.inject(model, mms.MoSLoRAConfig(rank=6, mixer_init=init, targets=["0"]))
        mixers[init] = _adapter(model).mixer.detach()
    torch.testing.assert_close(mixers["orthogonal"] @ mixers["orthogonal"].T, torch.eye(6))
    assert torch.equal(mixers["identity"], torch.eye(6))
    assert torch.count_nonzero(mixers["zero"]) == 0
    with pytest.raises(ConfigError, match="mixer_init 'xavier'"):
        mms.MoSLoRAConfig(mixer_init="xavier")


def test_ts_mixing_equals_closed_form_and_its_mixer_is_fixed():
    """MoSLoRA Eq. (3) = Eq. (6): x(A1 + A2)(B1 + B2) = B·[[I, I], [I, I]]·A."""
    torch.manual_seed(0)
    model = _net()
    base = model[0]
    mms.inject(model, mms.TSMixingConfig(rank=4, alpha=4, targets=["0"], init_weights=False))
    a = _adapter(model)
    A, B = a.lora_A.detach(), a.lora_B.detach()
    x = torch.randn(6, 12)
    # row form of the paper: A1, A2 = halves of the rank dimension
    A1, A2, B1, B2 = A[:2], A[2:], B[:, :2], B[:, 2:]
    by_hand = base(x) + (x @ (A1 + A2).T) @ (B1 + B2).T
    torch.testing.assert_close(model[0](x), by_hand)
    butterfly = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    assert torch.equal(a.mixer, butterfly)
    assert "mixer" not in dict(a.named_parameters())  # a buffer: no gradient, never in the optimizer
    model(x).sum().backward()
    assert a.lora_A.grad is not None and a.mixer.grad is None
    with pytest.raises(ConfigError, match="must be even"):
        mms.TSMixingConfig(rank=5)


def test_dropout_applies_to_the_adapter_input_only():
    model = _net()
    mms.inject(model, mms.LoraConfig(rank=4, dropout=0.5, targets=["0"], init_weights=False))
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    model.eval()
    a = _adapter(model)
    expected = model[0].base_layer(x) + a.scaling * x @ a.lora_A.T @ a.lora_B.T
    torch.testing.assert_close(model[0](x), expected)
    model.train()
    torch.manual_seed(1)
    out_train = model[0](x)
    assert not torch.allclose(out_train, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_its_dtype(dtype):
    model = _net().to(dtype)
    mms.inject(model, mms.MoSLoRAConfig(rank=4, targets=["0", "2"], dtype="float32"))
    assert _adapter(model).lora_A.dtype == torch.float32
    out = model(torch.randn(2, 12, dtype=dtype))
    assert out.dtype == dtype


def test_step_zero_equals_base_for_every_core_method():
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    for method in ("lora", "moslora", "ts_mixing"):
        model = _net()
        reference = model(x)
        mms.inject(model, mms.config_for(method, rank=4, targets=["0", "2"]))
        assert torch.equal(model(x), reference), method
