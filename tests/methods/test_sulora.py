"""SuLoRA: Eq. (4)-(5) by hand, AsyLoRA at N = r, routing, load balance (Eq. 6), gradients, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError, MergeError

IN, OUT = 16, 12


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(seed: int = 0, **kwargs) -> tuple[Net, nn.Module]:
    torch.manual_seed(seed)
    net = Net()
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("alpha", 8.0)
    mms.inject(net, mms.config_for("sulora", targets=["proj"], **kwargs))
    return net, net.proj.adapters["default"]


def by_hand(ad, x: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """Eq. (4)-(5) with a Python loop over instances: top-r of softmax(W_q · mean x), sorted, B = concat b_i."""
    base = nn.functional.linear(x, ad.base_weight(), ad.base_bias())
    outs = []
    for b in range(x.shape[0]):
        xb = x[b] if x.dim() == 3 else x[b : b + 1]
        hbar = xb[: lengths[b]].mean(0) if lengths else xb.mean(0)
        p = torch.softmax(ad.router @ hbar, -1)
        idx = torch.topk(p, ad.rank).indices.sort().values
        delta_w = ad.scaling * ad.lora_B[:, idx] @ ad.lora_A
        outs.append((xb @ delta_w.T).reshape(x[b].shape[:-1] + (OUT,)))
    return base + torch.stack(outs)


@pytest.mark.parametrize("shape", [(3, 5, IN), (4, IN)])
def test_forward_equals_eq4_by_hand(shape):
    net, ad = build(init_weights=False)
    x = torch.randn(*shape)
    torch.testing.assert_close(net(x), by_hand(ad, x), rtol=1e-5, atol=1e-6)
    assert ad.lora_B.shape == (OUT, 8) and ad.router.shape == (8, IN)  # default N = 2r


def test_step0_is_the_base():
    net, ad = build()
    x = torch.randn(2, 7, IN)
    assert torch.equal(net(x), nn.functional.linear(x, ad.base_weight(), ad.base_bias()))


@pytest.mark.parametrize("shape", [(3, 5, IN), (6, IN)])
@pytest.mark.parametrize("rank", [2, 4, 8])
def test_n_equals_r_is_asylora_exactly(shape, rank):
    su, sa = build(rank=rank, num_subspaces=rank, init_weights=False)
    torch.manual_seed(0)
    asy = Net()
    mms.inject(asy, mms.config_for("asylora", rank=rank, alpha=8.0, targets=["proj"], freeze="A"))
    asy.load_state_dict(su.state_dict(), strict=False)
    with torch.no_grad():
        asy.proj.adapters["default"].lora_A.copy_(sa.lora_A)
        asy.proj.adapters["default"].lora_B.copy_(sa.lora_B)
    x = torch.randn(*shape)
    assert torch.equal(su(x), asy(x))


def test_selected_indices_are_top_r_of_router_probs():
    net, ad = build(init_weights=False)
    x = torch.randn(5, 6, IN)
    probs, idx, top_p = ad.route(x)
    ref = torch.softmax(x.mean(1) @ ad.router.T, -1)
    torch.testing.assert_close(probs, ref)
    expect = torch.topk(ref, 4).indices
    assert torch.equal(idx, expect.sort(-1).values)
    assert torch.equal(top_p, ref.gather(-1, idx))
    net(x)
    assert torch.equal(ad.last_selection, idx)
    _, ad2 = build(init_weights=False, subspace_order="score")
    assert torch.equal(ad2.route(x)[1], expect)  # score order keeps top-r order


def test_score_order_equals_its_formula():
    net, ad = build(init_weights=False, subspace_order="score")
    x = torch.randn(3, 4, IN)
    idx = ad.route(x)[1]
    base = nn.functional.linear(x, ad.base_weight(), ad.base_bias())
    ref = torch.stack([x[b] @ (ad.scaling * ad.lora_B[:, idx[b]] @ ad.lora_A).T for b in range(3)])
    torch.testing.assert_close(net(x), base + ref, rtol=1e-5, atol=1e-6)


def test_two_instances_select_different_subspaces():
    net, ad = build(init_weights=False)
    x = torch.randn(8, 5, IN)
    idx = ad.route(x)[1]
    assert len({tuple(row.tolist()) for row in idx}) > 1


def test_load_balance_loss_is_negative_entropy():
    net, ad = build(init_weights=False, balance_coef=0.25)
    net.train()
    x = torch.randn(6, 5, IN)
    net(x)
    aux = mms.aux_loss(net)
    p = torch.softmax(x.mean(1) @ ad.router.T, -1).mean(0)
    entropy = -(p * p.log()).sum()
    torch.testing.assert_close(aux, 0.25 * -entropy)
    assert -math.log(8) * 0.25 - 1e-6 <= aux.item() < 0
    assert mms.aux_loss(net).item() == 0.0  # collected and reset
    net.eval()
    net(x)
    assert mms.aux_loss(net).item() == 0.0  # nothing recorded outside training


@pytest.mark.parametrize("balance_coef", [0.0, 0.01])
def test_router_receives_gradient(balance_coef):
    net, ad = build(init_weights=False, balance_coef=balance_coef)
    net.train()
    x = torch.randn(4, 5, IN)
    (net(x).square().sum() + mms.aux_loss(net)).backward()
    assert ad.router.grad is not None and ad.router.grad.abs().sum() > 0
    assert ad.lora_B.grad.abs().sum() > 0
    assert ad.lora_A.grad is None and not ad.lora_A.requires_grad  # A frozen after init


def test_straight_through_gradient_is_the_softmax_path():
    """With the balance loss off, ∂L/∂W_q flows only through the gate: dL/dp_{i_j} = <∂L/∂y, b_{i_j}> s (A x)_j, summed over tokens."""
    net, ad = build(init_weights=False, balance_coef=0.0)
    net.train()
    x = torch.randn(2, 3, IN)
    g_out = torch.randn(2, 3, OUT)
    (net(x) * g_out).sum().backward()
    router = ad.router.detach().clone().requires_grad_(True)
    hbar = x.mean(1)
    probs = torch.softmax(hbar @ router.T, -1)
    idx = ad.route(x)[1]
    h = x @ ad.lora_A.T * ad.scaling  # (2, 3, r)
    b_sel = ad.lora_B.detach()[:, idx].permute(1, 0, 2)  # (batch, out, r)
    coef = torch.einsum("bto,bor,btr->br", g_out, b_sel, h.detach())
    surrogate = (probs.gather(-1, idx) * coef).sum()
    surrogate.backward()
    torch.testing.assert_close(ad.router.grad, router.grad, rtol=1e-4, atol=1e-6)


def test_merge_and_plain_lora_export_raise_with_reason():
    net, ad = build(init_weights=False)
    x = torch.randn(2, 3, IN)
    y = net(x)
    with pytest.raises(MergeError, match="router"):
        mms.merge(net)
    with pytest.raises(MergeError, match="router"):
        mms.lora_factors(net)
    with pytest.raises(MergeError, match="per input instance"):
        mms.lora_state_dict(net)  # what export_peft / export_diffusers write
    with pytest.raises(MergeError):
        ad.delta_weight()
    assert torch.equal(net(x), y) and not net.proj.merged  # nothing was touched


def test_attention_mask_excludes_padding():
    net, ad = build(init_weights=False)
    lengths = [2, 5, 3]
    x = torch.randn(3, 5, IN)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        x[b, n:] = 1e3  # padding that would dominate an unmasked mean
    with mms.forward_context(net, attention_mask=mask):
        y = net(x)
    torch.testing.assert_close(y, by_hand(ad, x, lengths), rtol=1e-5, atol=1e-4)
    # a mask that does not match x (e.g. cross-attention keys of another length) is ignored
    with mms.forward_context(net, attention_mask=torch.ones(3, 9)):
        torch.testing.assert_close(net(x), by_hand(ad, x), rtol=1e-5, atol=1e-3)


def test_per_row_routing_with_sulora():
    net, ad = build(init_weights=False)
    torch.manual_seed(1)
    mms.inject(net, mms.config_for("sulora", rank=4, targets=["proj"], init_weights=False), adapter_name="other")
    x = torch.randn(4, 5, IN)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with mms.forward_context(net, adapter_rows=["default", "other", None, "default"], attention_mask=mask):
        routed = net(x)
    base = nn.functional.linear(x, ad.base_weight(), ad.base_bias())
    with mms.forward_context(net, attention_mask=mask):
        mms.set_adapter(net, "default")
        only_default = net(x)
        mms.set_adapter(net, "other")
        only_other = net(x)
    torch.testing.assert_close(routed[[0, 3]], only_default[[0, 3]])
    torch.testing.assert_close(routed[1], only_other[1])
    assert torch.equal(routed[2], base[2])


def test_config_errors():
    with pytest.raises(ConfigError, match="num_subspaces"):
        mms.config_for("sulora", rank=8, num_subspaces=4)
    with pytest.raises(ConfigError, match="subspace_order"):
        mms.config_for("sulora", subspace_order="random")
    with pytest.raises(ConfigError, match="balance_coef"):
        mms.config_for("sulora", balance_coef=-1.0)
    cfg = mms.config_for("sulora", rank=4, rank_pattern={"proj": 6})
    assert cfg.subspaces_for(6) == 12


def test_trainable_parameters_exclude_frozen_a():
    net, ad = build(rank=4)
    trainable, _ = mms.trainable_parameters(net)
    assert trainable == OUT * 8 + 8 * IN  # B bank (out, N) + router (N, in); A frozen
