"""Reconstruction methods (survey §3): bitfit, ia3, ssl, ssb, sam_parser — hand formulas, PEFT (IA)³ parity,
step-0 identity, merge/unmerge, save/load, export refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError, MergeError
from mm_subspace.registry import get_method

DIMS = (12, 16, 10)


def _net(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIMS[0], DIMS[1], bias=bias), nn.GELU(), nn.Linear(DIMS[1], DIMS[2], bias=bias))


def _inject(method: str, bias: bool = True, init_weights: bool = False, **kw) -> nn.Sequential:
    model = _net(bias)
    config = get_method(method).config_class(targets=["0", "2"], init_weights=init_weights, **kw)
    return mms.inject(model, config)


def _x(seed: int = 7) -> torch.Tensor:
    return torch.randn(3, 5, DIMS[0], generator=torch.Generator().manual_seed(seed))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w.T + (0 if b is None else b)


# hand-written formulas of one adapted layer: (adapter, x, W, b) -> y
FORMULAS = {
    "bitfit": lambda a, x, w, b: _linear(x, w, b) + a.lora_bias,
    "ia3": lambda a, x, w, b: a.l_out * _linear(x, w, b),
    "ssl": lambda a, x, w, b: _linear(x * a.l_in, w, b),
    "ssb": lambda a, x, w, b: a.l_out * _linear(x * a.l_in, w, b),
    # survey Eq. (4): W* = U Σ* Vᵀ, with W's own rounding residual W − UΣVᵀ kept
    "sam_parser": lambda a, x, w, b: _linear(x, w + a.svd_U @ torch.diag(a.sigma - a.svd_S) @ a.svd_Vh, b),
}
CASES = [("bitfit", {}), ("ia3", {}), ("ia3", {"feedforward": True}), ("ssl", {}), ("ssb", {}), ("sam_parser", {})]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method,kw", CASES)
def test_forward_matches_hand_formula(method, kw, bias):
    model = _inject(method, bias=bias, **kw)
    x = _x()
    h = model[0](x)
    for name, inp in (("0", x), ("2", model[1](h))):
        layer = model.get_submodule(name)
        adapter = layer.adapters["default"]
        formula = FORMULAS[method]
        if method == "ia3" and kw.get("feedforward"):
            formula = FORMULAS["ssl"]
        expected = formula(adapter, inp, layer.base_layer.weight, layer.base_layer.bias)
        torch.testing.assert_close(layer(inp), expected, rtol=1e-5, atol=1e-5)


def test_sam_parser_buffers_are_the_svd_of_w_and_sigma_the_paper_form():
    """Survey §3.1: W = UΣVᵀ at injection; the adapted layer is U·diag(σ)·Vᵀ x + b up to W's SVD rounding."""
    model = _inject("sam_parser")
    layer = model[0]
    a = layer.adapters["default"]
    w = layer.base_layer.weight
    torch.testing.assert_close(a.svd_U @ torch.diag(a.svd_S) @ a.svd_Vh, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.svd_U.T @ a.svd_U, torch.eye(min(w.shape)), rtol=0, atol=1e-5)
    x = _x()
    paper = x @ (a.svd_U @ torch.diag(a.sigma) @ a.svd_Vh).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), paper, rtol=1e-5, atol=1e-5)
    assert dict(a.named_parameters()).keys() == {"sigma"}


@pytest.mark.parametrize("method,kw", CASES)
def test_step_zero_is_the_base_exactly(method, kw):
    x = _x()
    base = _net()(x)
    model = _inject(method, init_weights=True, **kw)
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method,kw", CASES)
def test_merge_unmerge(method, kw, bias):
    model = _inject(method, bias=bias, **kw)
    x = _x()
    before = model(x)
    weights = [(m.base_layer.weight.clone(), None if m.base_layer.bias is None else m.base_layer.bias.clone())
               for _, m in mms.adapter_layers(model)]
    mms.merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    mms.unmerge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for (w, b), (_, layer) in zip(weights, mms.adapter_layers(model)):
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=1e-6, atol=1e-6)
        if b is None:
            assert layer.base_layer.bias is None  # a bias created by merging BitFit is removed again
        else:
            torch.testing.assert_close(layer.base_layer.bias, b, rtol=1e-6, atol=1e-6)


def test_bitfit_merge_touches_only_the_bias_and_creates_one_when_missing():
    model = _inject("bitfit", bias=False)
    w = model[0].base_layer.weight.clone()
    mms.merge(model)
    assert torch.equal(model[0].base_layer.weight, w)
    assert torch.equal(model[0].base_layer.bias, model[0].adapters["default"].lora_bias.detach())
    assert not model[0].base_layer.bias.requires_grad
    unloaded = mms.merge_and_unload(_inject("bitfit", bias=False))
    assert isinstance(unloaded[0], nn.Linear) and unloaded[0].bias is not None


def test_ia3_merge_scales_bias_only_for_output_scaling():
    for feedforward in (False, True):
        model = _inject("ia3", feedforward=feedforward)
        b = model[0].base_layer.bias.clone()
        a = model[0].adapters["default"]
        mms.merge(model)
        expected = b if feedforward else b * a.l_out.detach()
        torch.testing.assert_close(model[0].base_layer.bias, expected)


def test_ia3_feedforward_list_selects_modules_and_bad_value_errors():
    model = _inject("ia3", feedforward=["2"])
    assert model[0].adapters["default"].l_in is None and model[0].adapters["default"].l_out is not None
    assert model[2].adapters["default"].l_in is not None and model[2].adapters["default"].l_out is None
    with pytest.raises(ConfigError, match="feedforward"):
        mms.config_for("ia3", feedforward="down_proj")


def test_scaling_merge_refuses_a_zero_entry():
    model = _inject("ssb")
    with torch.no_grad():
        model[0].adapters["default"].l_in[3] = 0.0
    with pytest.raises(MergeError, match="zero entry"):
        model[0].merge(["default"])


@pytest.mark.parametrize("method,kw", CASES)
def test_set_scale_interpolates_to_the_base(method, kw):
    model = _inject(method, **kw)
    x = _x()
    adapted = model(x)
    mms.set_scale(model, "default", 0.0)
    with mms.disable_adapters(model):
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)
    mms.set_scale(model, "default", 1.0)
    assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("method,kw", CASES)
def test_save_load_round_trip_is_bit_exact(method, kw, tmp_path):
    model = _inject(method, **kw)
    x = _x()
    mms.save_adapter(model, tmp_path)
    fresh = _net()
    mms.load_adapter(fresh, tmp_path)
    saved = mms.adapter_state_dict(model)
    loaded = mms.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("method,kw", [c for c in CASES if c[0] != "sam_parser"])
def test_plain_lora_export_is_refused_with_the_reason(method, kw):
    model = _inject(method, **kw)
    with pytest.raises(MergeError, match="cannot export"):
        mms.lora_factors(model)


def test_sam_parser_plain_lora_export_is_exact():
    model = _inject("sam_parser")
    for name, (down, up, scaling) in mms.lora_factors(model).items():
        a = model.get_submodule(name).adapters["default"]
        assert down.shape[0] == min(a.in_features, a.out_features)
        torch.testing.assert_close(scaling * up @ down, a.delta_weight())


def test_ia3_matches_peft(tmp_path):
    """Same vectors in PEFT 0.21's IA3 (feedforward_modules=['2']) and ours: outputs and merged weights agree."""
    import peft

    x = _x()
    ours = _inject("ia3", feedforward=["2"])
    theirs = peft.get_peft_model(_net(), peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    with torch.no_grad():
        for name in ("0", "2"):
            target = theirs.base_model.model.get_submodule(name).ia3_l["default"]
            target.copy_(ours.get_submodule(name).adapters["default"].get_parameter(
                "l_in" if name == "2" else "l_out").view_as(target))
    assert torch.equal(ours[0](x), theirs.base_model.model[0](x))  # output scaling: the same op, bit for bit
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    mms.merge(ours)
    merged = theirs.merge_and_unload()
    for name in ("0", "2"):
        torch.testing.assert_close(ours.get_submodule(name).base_layer.weight, merged.get_submodule(name).weight)
        torch.testing.assert_close(ours.get_submodule(name).base_layer.bias, merged.get_submodule(name).bias)


@pytest.mark.parametrize("method,kw", CASES)
def test_thirty_steps_reduce_a_regression_loss(method, kw, fit):
    model = _inject(method, init_weights=True, **kw)
    torch.manual_seed(3)
    x, target = torch.randn(32, DIMS[0]), torch.randn(32, DIMS[2])
    first, last = fit(model, x, target, lr=0.05)
    assert last < 0.9 * first
