"""Combination methods (survey §5): dora (+ MoSLoRA mixer), spectral, svdiff — hand formulas, PEFT DoRA parity,
step-0 identity, merge/unmerge, save/load, plain-LoRA export; trainable counts for the README table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import MergeError
from mm_subspace.methods.spectral import cayley
from mm_subspace.registry import get_method

DIMS = (12, 16, 10)
R = 4


def _net(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIMS[0], DIMS[1], bias=bias), nn.GELU(), nn.Linear(DIMS[1], DIMS[2], bias=bias))


def _inject(method: str, bias: bool = True, init_weights: bool = False, **kw) -> nn.Sequential:
    model = _net(bias)
    config = get_method(method).config_class(rank=R, alpha=2 * R, targets=["0", "2"], init_weights=init_weights, **kw)
    mms.inject(model, config)
    if method == "dora" and not init_weights:  # a magnitude away from ‖W + ΔW‖, so the rescaling is exercised
        torch.manual_seed(11)
        with torch.no_grad():
            for _, a in mms.iter_adapters(model):
                a.magnitude.mul_(torch.empty_like(a.magnitude).uniform_(0.5, 1.5))
    return model


def _x(seed: int = 7) -> torch.Tensor:
    return torch.randn(3, 5, DIMS[0], generator=torch.Generator().manual_seed(seed))


def _dora_weight(a, w: torch.Tensor) -> torch.Tensor:
    """DoRA Eq. (5): m ⊙ (W + s·B·M·A) / ‖W + s·B·M·A‖ per output row."""
    mixer = torch.eye(a.rank) if a.mixer is None else a.mixer
    v = w + (a.alpha / a.rank) * a.lora_B @ mixer @ a.lora_A
    return a.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)


def _spectral_additive_weight(a, w: torch.Tensor) -> torch.Tensor:
    """Survey Eq. (32): [U_r + A_U, U_rest] Σ [V_r + A_V, V_rest]ᵀ, the rest being W − U_r Σ_r V_rᵀ."""
    u, s, v = a.svd_U, torch.diag(a.svd_S), a.svd_Vh.T
    return w - u @ s @ v.T + (u + a.delta_U) @ s @ (v + a.delta_V).T


def _spectral_rotational_weight(a, w: torch.Tensor) -> torch.Tensor:
    """[U_r R_U, U_rest] Σ [V_r R_V, V_rest]ᵀ with R = (I + Q)(I − Q)⁻¹, Q = (P − Pᵀ)/2."""
    def rot(p):
        q = (p - p.T) / 2
        eye = torch.eye(p.shape[0])
        return (eye + q) @ torch.linalg.inv(eye - q)

    u, s, v = a.svd_U, torch.diag(a.svd_S), a.svd_Vh.T
    return w - u @ s @ v.T + (u @ rot(a.rotation_U)) @ s @ (v @ rot(a.rotation_V)).T


def _svdiff_weight(a, w: torch.Tensor) -> torch.Tensor:
    """Han et al. Eq. (2): U ReLU(Σ + δ) Vᵀ, with W's SVD rounding residual kept."""
    u, vh = a.svd_U, a.svd_Vh
    return w - u @ torch.diag(a.svd_S) @ vh + u @ torch.diag(torch.relu(a.svd_S + a.spectral_shift)) @ vh


CASES = [
    ("dora", {}, _dora_weight),
    ("dora", {"mixer_init": "kaiming_uniform"}, _dora_weight),
    ("spectral", {}, _spectral_additive_weight),
    ("spectral", {"variant": "rotational"}, _spectral_rotational_weight),
    ("svdiff", {}, _svdiff_weight),
]
IDS = ["dora", "moslora_dora", "spectral_a", "spectral_r", "svdiff"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method,kw,weight_fn", CASES, ids=IDS)
def test_forward_matches_hand_formula(method, kw, weight_fn, bias):
    model = _inject(method, bias=bias, **kw)
    x = _x()
    for name, inp in (("0", x), ("2", model[1](model[0](x)))):
        layer = model.get_submodule(name)
        w, b = layer.base_layer.weight, layer.base_layer.bias
        expected = inp @ weight_fn(layer.adapters["default"], w).T + (0 if b is None else b)
        torch.testing.assert_close(layer(inp), expected, rtol=1e-5, atol=1e-5)


def test_svd_buffers_are_the_top_singular_triplets():
    model = _inject("spectral")
    a = model[0].adapters["default"]
    w = model[0].base_layer.weight.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(a.svd_S.double(), s[:R], rtol=1e-5, atol=1e-6)
    # sign-free: same top-r column and row spaces
    torch.testing.assert_close((a.svd_U @ a.svd_U.T).double(), u[:, :R] @ u[:, :R].T, rtol=0, atol=1e-5)
    torch.testing.assert_close((a.svd_Vh.T @ a.svd_Vh).double(), vh[:R].T @ vh[:R], rtol=0, atol=1e-5)


def test_cayley_is_orthogonal_and_identity_at_zero():
    p = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    rot = cayley(p)
    torch.testing.assert_close(rot @ rot.T, torch.eye(5), rtol=0, atol=1e-5)
    assert torch.equal(cayley(torch.zeros(5, 5)), torch.eye(5))


def test_svdiff_relu_keeps_singular_values_nonnegative():
    """Survey Eq. (35): the shift is H_Σ(δ) = max(δ, −Σ); a shift below −Σ stops at zero."""
    model = _inject("svdiff")
    a = model[0].adapters["default"]
    with torch.no_grad():
        a.spectral_shift.copy_(-2 * a.svd_S)
    torch.testing.assert_close(a.shift(), -a.svd_S)
    x = _x()
    residual = model[0].base_layer.weight - a.svd_U @ torch.diag(a.svd_S) @ a.svd_Vh
    torch.testing.assert_close(model[0](x), x @ residual.T + model[0].base_layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,kw,weight_fn", CASES, ids=IDS)
def test_step_zero_is_the_base_exactly(method, kw, weight_fn):
    x = _x()
    base = _net()(x)
    model = _inject(method, init_weights=True, **kw)
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("method,kw,weight_fn", CASES, ids=IDS)
def test_zero_init_factors_still_get_gradients(method, kw, weight_fn):
    model = _inject(method, init_weights=True, **kw)
    model(_x()).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    nonzero = {n.rsplit(".", 1)[-1] for n, g in grads.items() if g.abs().sum() > 0}
    # DoRA: B = 0 blocks A's (and the mixer's) gradient, as in LoRA; the others are additive in each factor
    expected = {"dora": {"lora_B", "magnitude"}, "svdiff": {"spectral_shift"},
                "spectral": {"rotation_U", "rotation_V"} if kw.get("variant") else {"delta_U", "delta_V"}}[method]
    assert expected <= nonzero


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method,kw,weight_fn", CASES, ids=IDS)
def test_merge_unmerge(method, kw, weight_fn, bias):
    model = _inject(method, bias=bias, **kw)
    x = _x()
    before = model(x)
    weights = [m.base_layer.weight.clone() for _, m in mms.adapter_layers(model)]
    mms.merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for w, (_, layer) in zip(weights, mms.adapter_layers(model)):
        expected = weight_fn(layer.adapters["default"], w)
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=1e-5, atol=1e-5)
    mms.unmerge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for w, (_, layer) in zip(weights, mms.adapter_layers(model)):
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,kw,weight_fn", CASES, ids=IDS)
def test_save_load_round_trip_is_bit_exact(method, kw, weight_fn, tmp_path):
    model = _inject(method, **kw)
    x = _x()
    mms.save_adapter(model, tmp_path)
    fresh = _net()
    mms.load_adapter(fresh, tmp_path)
    saved, loaded = mms.adapter_state_dict(model), mms.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("method,kw,weight_fn,rank", [
    ("spectral", {}, _spectral_additive_weight, 2 * R),  # rank 2r: [A_U Σ | U_r Σ]·[(V_r + A_V)ᵀ ; A_Vᵀ]
    ("spectral", {"variant": "rotational"}, _spectral_rotational_weight, R),
    ("svdiff", {}, _svdiff_weight, min(DIMS[:2])),
])
def test_plain_lora_export_is_exact(method, kw, weight_fn, rank):
    model = _inject(method, **kw)
    down, up, scaling = mms.lora_factors(model)["0"]
    assert down.shape[0] == rank
    w = model[0].base_layer.weight
    torch.testing.assert_close(w + scaling * up @ down, weight_fn(model[0].adapters["default"], w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["spectral", "svdiff"])
def test_peft_export_reproduces_the_outputs(method, tmp_path):
    """export_peft writes the exact factors; stock PEFT loads them (svdiff: per-layer ranks via rank_pattern)."""
    import peft

    model = _inject(method)
    x = _x()
    mms.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(_net(), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_dora_refuses_plain_lora_export_with_the_reason():
    with pytest.raises(MergeError, match="not a rank-r product"):
        mms.lora_factors(_inject("dora"))


def _peft_dora(ours: nn.Module, dropout: float = 0.0):
    import peft

    config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["0", "2"], use_dora=True,
                             init_lora_weights=False, lora_dropout=dropout)
    theirs = peft.get_peft_model(_net(), config)
    with torch.no_grad():
        for name in ("0", "2"):
            mine, peft_layer = ours.get_submodule(name).adapters["default"], theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(mine.magnitude)
    return theirs


def test_dora_matches_peft_outputs_gradients_and_merged_weights():
    x = _x()
    ours = _inject("dora")
    theirs = _peft_dora(ours)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)
    out_ours.pow(2).sum().backward()
    out_theirs.pow(2).sum().backward()
    for name in ("0", "2"):  # same gradients: the norm is detached in both (DoRA §4.3)
        mine, peft_layer = ours.get_submodule(name).adapters["default"], theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.magnitude.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-5, atol=1e-6)
    mms.merge(ours)
    merged = theirs.merge_and_unload()
    for name in ("0", "2"):
        torch.testing.assert_close(ours.get_submodule(name).base_layer.weight, merged.get_submodule(name).weight,
                                   rtol=1e-6, atol=1e-6)


def test_dora_matches_peft_with_dropout_in_training():
    """With active dropout PEFT rescales W·drop(x) instead of the base output; same masks, same result."""
    x = _x()
    ours = _inject("dora", dropout=0.5)
    theirs = _peft_dora(ours, dropout=0.5)
    ours.train()
    theirs.train()
    torch.manual_seed(5)
    out_ours = ours(x)
    torch.manual_seed(5)
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)


def test_dora_magnitude_starts_at_the_row_norm_of_w():
    model = _inject("dora", init_weights=True)
    a = model[0].adapters["default"]
    torch.testing.assert_close(a.magnitude, model[0].base_layer.weight.norm(dim=1))


def test_moslora_dora_mixer_changes_the_output():
    """The mixer must act inside DoRA (the official MoSLoRA code drops it): same A, B, m, different M."""
    x = _x()
    plain, mixed = _inject("dora"), _inject("dora", mixer_init="orthogonal")
    with torch.no_grad():
        for name in ("0", "2"):
            p, m = plain.get_submodule(name).adapters["default"], mixed.get_submodule(name).adapters["default"]
            m.lora_A.copy_(p.lora_A)
            m.lora_B.copy_(p.lora_B)
            m.magnitude.copy_(p.magnitude)
    assert not torch.allclose(plain(x), mixed(x), atol=1e-3)
    with torch.no_grad():
        for name in ("0", "2"):
            mixed.get_submodule(name).adapters["default"].mixer.copy_(torch.eye(R))
    torch.testing.assert_close(plain(x), mixed(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,kw,weight_fn", CASES, ids=IDS)
def test_thirty_steps_reduce_a_regression_loss(method, kw, weight_fn, fit):
    """A reachable target: the same method with randomly drawn parameters (a teacher)."""
    model = _inject(method, init_weights=True, **kw)
    torch.manual_seed(3)
    x = torch.randn(32, DIMS[0])
    with torch.no_grad():
        target = _inject(method, init_weights=False, **kw)(x)
    first, last = fit(model, x, target, lr=0.02)
    assert last < 0.9 * first


# trainable parameters of one 4096×4096 layer at r = 8 (the README method table); built on the meta
# device, SVD included (shapes only). Analytic: d = 4096, r = 8.
D = 4096
COUNTS = {
    ("bitfit", ()): D,
    ("ia3", ()): D,
    ("ssl", ()): D,
    ("ssb", ()): 2 * D,
    ("sam_parser", ()): D,  # min(in, out) singular values
    ("svdiff", ()): D,
    ("spectral", ()): 2 * D * 8,  # A_U (out, r) + A_V (in, r)
    ("spectral", (("variant", "rotational"),)): 2 * 8 * 8,
    ("dora", ()): 2 * D * 8 + D,  # A, B, m
    ("dora", (("mixer_init", "orthogonal"),)): 2 * D * 8 + D + 8 * 8,
}


@pytest.mark.parametrize("key", list(COUNTS), ids=lambda k: "-".join([k[0], *(v for _, v in k[1])]))
def test_trainable_counts_for_a_4096_layer_at_rank_8(key):
    method, kw = key
    model = nn.Sequential(nn.Linear(D, D, bias=False, device="meta"))
    mms.inject(model, get_method(method).config_class(rank=8, alpha=16, targets=["0"], **dict(kw)))
    assert mms.trainable_parameters(model)[0] == COUNTS[key]
