"""MPC (survey §4.2): MPC_o Eq. (20), MPC_d Eq. (21), MPC_n; orientation, values, gradients, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError, MergeError
from mm_subspace.losses import mpc_diagonal, mpc_orthogonal

R, IN, OUT = 4, 12, 9
AB_METHODS = ["lora", "moslora", "ts_mixing", "asylora", "sulora", "flora", "trilora"]


def survey_form(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The survey's A (n×r) and B (r×m) from our lora_A (r, in) and lora_B (out, r)."""
    return down.T, up.T


def orthonormal(rows: int, cols: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols)))
    return q if rows >= cols else q.T


def test_zero_for_orthogonal_factors_positive_otherwise():
    torch.manual_seed(0)
    down, up = orthonormal(R, IN), orthonormal(OUT, R)  # orthonormal rows of A, columns of B
    assert mpc_orthogonal(down, up).item() == pytest.approx(0.0, abs=1e-10)
    assert mpc_diagonal(down, up).item() == pytest.approx(0.0, abs=1e-10)
    scaled = up * torch.tensor([0.5, 2.0, 3.0, 1.0])  # still orthogonal columns, not unit length
    assert mpc_diagonal(down, scaled).item() == pytest.approx(0.0, abs=1e-10)
    assert mpc_orthogonal(down, scaled).item() > 1.0
    skew = up + 0.3 * torch.randn_like(up)
    assert mpc_diagonal(down, skew).item() > 1e-3
    assert mpc_orthogonal(2 * down, up).item() > 1.0


def test_values_match_the_survey_equations():
    torch.manual_seed(1)
    down, up = torch.randn(R, IN), torch.randn(OUT, R)
    A, B = survey_form(down, up)
    eye = torch.eye(R)
    eq20 = (A.T @ A - eye).square().sum() + (B @ B.T - eye).square().sum()
    gram = B @ B.T
    eq21 = (A.T @ A - eye).square().sum() + (gram - torch.diag(torch.diag(gram))).square().sum()
    torch.testing.assert_close(mpc_orthogonal(down, up), eq20)
    torch.testing.assert_close(mpc_diagonal(down, up), eq21)
    assert (A.T @ A).shape == (R, R) and (B @ B.T).shape == (R, R)  # constraints on the r×r Gram matrices


def build(method: str, **kwargs) -> tuple[nn.Sequential, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT))
    kwargs.setdefault("init_weights", False)
    if method == "sulora":
        kwargs.setdefault("balance_coef", 0.0)
    mms.inject(net, mms.config_for(method, rank=R, targets=["0"], **kwargs))
    return net, net[0].adapters["default"]


@pytest.mark.parametrize("mode", ["orthogonal", "diagonal"])
@pytest.mark.parametrize("method", AB_METHODS)
def test_penalty_recorded_in_training_and_reaches_a_and_b(method, mode):
    net, ad = build(method, mpc=mode, mpc_coef=0.5)
    x = torch.randn(3, 5, IN)
    net.eval()
    net(x)
    assert mms.aux_loss(net).item() == 0.0  # only recorded in training
    net.train()
    net(x)
    aux = mms.aux_loss(net)
    fn = mpc_orthogonal if mode == "orthogonal" else mpc_diagonal
    torch.testing.assert_close(aux, 0.5 * fn(ad.lora_A, ad.lora_B))  # SuLoRA: on the whole bank (out, N)
    assert aux.item() > 0
    aux.backward()
    for name in ("lora_A", "lora_B"):
        param = getattr(ad, name)
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert any(getattr(ad, n).requires_grad for n in ("lora_A", "lora_B"))


def test_gradients_reach_a_and_b_for_lora():
    net, ad = build("lora", mpc="diagonal")
    net.train()
    net(torch.randn(2, IN))
    mms.aux_loss(net).backward()
    assert ad.lora_A.grad.abs().sum() > 0 and ad.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("method", AB_METHODS)
def test_nonlinear_inserts_sigma_and_refuses_merge(method):
    net, ad = build(method, mpc="nonlinear", mpc_activation="tanh")
    x = torch.randn(4, IN)
    y = net(x)
    if method != "sulora":  # SuLoRA's routed form is covered by its own formula test
        core = {"moslora": "mixer", "flora": "mixer", "ts_mixing": "mixer"}.get(method)
        h = x @ ad.lora_A.T
        if core:
            h = h @ getattr(ad, core).T
        if method == "trilora":
            h = h * ad.lora_E
        ref = net[0].base_layer(x) + ad.scaling * torch.tanh(h) @ ad.lora_B.T
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeError):
        mms.merge(net)
    with pytest.raises(MergeError):
        mms.lora_factors(net)


@pytest.mark.parametrize("pairing", ["paired", "index"])
def test_sulora_nonlinear_formula(pairing):
    net, ad = build("sulora", mpc="nonlinear", pairing=pairing)
    x = torch.randn(3, IN)
    idx = ad.route(x)[1]
    a = [ad.lora_A[idx[b]] if pairing == "paired" else ad.lora_A for b in range(3)]  # paired: sub-space i's own row
    ref = torch.stack([ad.scaling * ad.lora_B[:, idx[b]] @ torch.relu(a[b] @ x[b]) for b in range(3)])
    torch.testing.assert_close(net(x), net[0].base_layer(x) + ref, rtol=1e-5, atol=1e-6)


def test_config_checks():
    with pytest.raises(ConfigError, match="mpc"):
        mms.config_for("lora", mpc="orthogonol")
    with pytest.raises(ConfigError, match="mpc_coef"):
        mms.config_for("moslora", mpc="orthogonal", mpc_coef=-1)
    with pytest.raises(ConfigError, match="mpc_activation"):
        mms.config_for("flora", mpc="nonlinear", mpc_activation="softmax")
    assert "mpc" not in mms.config_for("parallel_adapter").field_names()
    cfg = mms.config_for("trilora", mpc="orthogonal")
    assert mms.AdapterConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_records_once_per_step(reentrant):
    from torch.utils.checkpoint import checkpoint

    net, ad = build("sulora", mpc="orthogonal", balance_coef=0.1)
    net.train()
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = checkpoint(net, x, use_reentrant=reentrant)
    aux = mms.aux_loss(net)
    (y.square().sum() + aux).backward()  # the recomputed forward runs inside backward
    assert mms.aux_loss(net).item() == 0.0  # nothing stale left for the next step
    assert ad.router.grad.abs().sum() > 0
