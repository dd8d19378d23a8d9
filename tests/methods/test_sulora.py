"""SuLoRA: Eq. (4)-(5) by hand in both pairings, AsyLoRA at N = r, routing, load balance (Eq. 6), gradients,
refusals, the frozen A's init, old saved configs, empty batches."""

from __future__ import annotations

import json
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
    """Eq. (4)-(5) with a Python loop over instances: top-r of softmax(W_q · mean x / T), sorted, B = concat b_i;
    against A's rows 1..r (``pairing="index"``) or against the chosen rows a_i themselves (``"paired"``)."""
    base = nn.functional.linear(x, ad.base_weight(), ad.base_bias())
    outs = []
    for b in range(x.shape[0]):
        xb = x[b] if x.dim() == 3 else x[b : b + 1]
        hbar = xb[: lengths[b]].mean(0) if lengths else xb.mean(0)
        p = torch.softmax(ad.router @ hbar / ad.config.router_temperature, -1)
        idx = torch.topk(p, ad.rank).indices.sort().values
        a = ad.lora_A[idx] if ad.config.pairing == "paired" else ad.lora_A
        delta_w = ad.scaling * ad.lora_B[:, idx] @ a
        outs.append((xb @ delta_w.T).reshape(x[b].shape[:-1] + (OUT,)))
    return base + torch.stack(outs)


@pytest.mark.parametrize("pairing", ["paired", "index"])
@pytest.mark.parametrize("shape", [(3, 5, IN), (4, IN)])
def test_forward_equals_eq4_by_hand(shape, pairing):
    net, ad = build(init_weights=False, pairing=pairing)
    x = torch.randn(*shape)
    torch.testing.assert_close(net(x), by_hand(ad, x), rtol=1e-5, atol=1e-6)
    assert ad.lora_B.shape == (OUT, 8) and ad.router.shape == (8, IN)  # default N = 2r
    assert ad.lora_A.shape == ((8, IN) if pairing == "paired" else (4, IN))


def test_defaults_are_paired_and_orthonormal():
    _, ad = build()
    assert (ad.config.pairing, ad.config.a_init, ad.config.router_temperature) == ("paired", "orthonormal", 1.0)
    assert ad.lora_A.shape == (8, IN) and not ad.lora_A.requires_grad


def test_paired_subspace_is_its_own_row_and_column():
    """Paired: relabelling the sub-spaces (rows of A and of W_q, columns of B, one permutation) changes nothing,
    because sub-space i is (a_i, b_i) whatever else is chosen. Index (Eq. 4 literal): the same relabelling moves
    columns of B against other rows of A, so the output changes."""
    x = torch.randn(5, 6, IN)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    for pairing in ("paired", "index"):
        net, ad = build(init_weights=False, pairing=pairing)
        y = net(x)
        with torch.no_grad():
            ad.router.copy_(ad.router[perm])
            ad.lora_B.copy_(ad.lora_B[:, perm])
            if pairing == "paired":
                ad.lora_A.copy_(ad.lora_A[perm])
        if pairing == "paired":
            torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)
        else:
            assert not torch.allclose(net(x), y, atol=1e-3)


def today_forward(ad, x: torch.Tensor) -> torch.Tensor:
    """The forward before ``pairing`` existed, op for op: index-order top-r, h = A x scattered into N slots, z·Bᵀ."""
    batch = x.shape[0]
    probs = nn.functional.linear(ad.summarize(x), ad.router).float().softmax(-1)
    top_p, idx = probs.topk(ad.rank, dim=-1)
    idx, perm = idx.sort(-1)
    top_p = top_p.gather(-1, perm)
    gate = (top_p - top_p.detach()) + 1.0
    h = nn.functional.linear(x, ad.lora_A).reshape(batch, -1, ad.rank)
    h = (h * ad.total_scale) * gate.unsqueeze(1)
    z = h.new_zeros(batch, h.shape[1], ad.num_subspaces).scatter(-1, idx.unsqueeze(1).expand(-1, h.shape[1], -1), h)
    base = nn.functional.linear(x, ad.base_weight(), ad.base_bias())
    return base + nn.functional.linear(z, ad.lora_B).reshape(base.shape)


@pytest.mark.parametrize("shape", [(3, 5, IN), (4, IN)])
def test_index_mode_with_kaiming_a_is_the_previous_sulora_bit_for_bit(shape):
    """Same seeded init (Kaiming-uniform A (r, in), bank, router, drawn in that order) and the same output."""
    net, ad = build(init_weights=False, pairing="index", a_init="kaiming")
    torch.manual_seed(0)
    Net()
    expect = {}
    for name, rows_cols in (("lora_A", (4, IN)), ("lora_B", (OUT, 8)), ("router", (8, IN))):
        expect[name] = nn.init.kaiming_uniform_(torch.empty(*rows_cols), a=math.sqrt(5))
        assert torch.equal(getattr(ad, name), expect[name]), name
    x = torch.randn(*shape)
    assert torch.equal(net(x), today_forward(ad, x))


def test_old_saved_config_loads_as_index_with_kaiming_a(tmp_path):
    """An adapter saved before pairing/a_init existed (no such keys) keeps its meaning: Eq. 4 literal, r×in A."""
    cfg = mms.config_for("sulora", rank=4, targets=["proj"]).to_dict()
    old = {k: v for k, v in cfg.items() if k not in ("pairing", "a_init", "router_temperature")}
    loaded = mms.AdapterConfig.from_dict(old)
    assert (loaded.pairing, loaded.a_init, loaded.router_temperature) == ("index", "kaiming", 1.0)
    assert mms.AdapterConfig.from_dict(cfg).pairing == "paired"  # a new file says what it is
    # on disk: an index-mode adapter whose config file lacks the new keys reloads to the same outputs
    net, ad = build(init_weights=False, pairing="index", a_init="kaiming")
    x = torch.randn(3, 5, IN)
    mms.save_adapter(net, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("pairing", "a_init", "router_temperature"):
        del meta["config"][key]
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    fresh = Net()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in net.state_dict().items() if "adapters" not in k})
    mms.load_adapter(fresh, tmp_path)
    assert fresh.proj.adapters["default"].config.pairing == "index"
    assert torch.equal(fresh(x), net(x))


@pytest.mark.parametrize("pairing", ["paired", "index"])
def test_save_load_round_trip_keeps_the_frozen_a(tmp_path, pairing):
    net, ad = build(init_weights=False, pairing=pairing)
    x = torch.randn(3, 5, IN)
    mms.save_adapter(net, tmp_path)
    torch.manual_seed(0)
    fresh = Net()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in net.state_dict().items() if "adapters" not in k})
    mms.load_adapter(fresh, tmp_path)
    other = fresh.proj.adapters["default"]
    assert other.lora_A.shape == ad.lora_A.shape and torch.equal(other.lora_A, ad.lora_A)
    assert not other.lora_A.requires_grad
    assert torch.equal(fresh(x), net(x))


@pytest.mark.parametrize("rows", [4, 8, 16])
def test_orthonormal_a_has_orthonormal_rows(rows):
    """A·Aᵀ = I for N ≤ in (16); N = 2·in: two orthonormal blocks of 16 rows, every row of unit norm."""
    _, ad = build(rank=4, num_subspaces=max(rows, 4), pairing="paired")
    a = ad.lora_A.detach()
    assert a.shape == (rows, IN)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(rows))
    for start in range(0, rows, IN):
        block = a[start : start + IN]
        torch.testing.assert_close(block @ block.T, torch.eye(block.shape[0]), atol=1e-5, rtol=0)
    _, kai = build(rank=4, pairing="paired", a_init="kaiming")
    assert kai.lora_A.norm(dim=1).max() < 0.9  # Kaiming (a = √5) rows are shorter: ≈ 0.58 expected
    _, ad_index = build(rank=4, pairing="index")
    torch.testing.assert_close(ad_index.lora_A @ ad_index.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)


def test_router_temperature_divides_the_logits():
    x = torch.randn(5, 6, IN)
    _, ad = build(init_weights=False)
    _, sharp = build(init_weights=False, router_temperature=0.25)
    assert torch.equal(sharp.router, ad.router)
    logits = x.mean(1) @ ad.router.T
    probs, idx, _ = ad.route(x)
    sharp_probs, sharp_idx, _ = sharp.route(x)
    torch.testing.assert_close(sharp_probs, (logits / 0.25).softmax(-1))
    assert torch.equal(idx, sharp_idx)  # softmax is monotone: the same choice
    entropy = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    assert (entropy(sharp_probs) < entropy(probs)).all()
    # default 1.0 is the plain softmax of Eq. (5), bit for bit
    assert torch.equal(probs, logits.float().softmax(-1))


@pytest.mark.parametrize("pairing", ["paired", "index"])
@pytest.mark.parametrize("shape", [(0, 5, IN), (0, IN)])
def test_empty_batch_returns_an_empty_output(shape, pairing):
    net, ad = build(init_weights=False, pairing=pairing)
    net.train()
    x = torch.randn(*shape)
    y = net(x)
    assert y.shape == (*shape[:-1], OUT)
    assert ad.last_selection.shape == (0, 4)
    assert mms.aux_loss(net).item() == 0.0


def test_step0_is_the_base():
    net, ad = build()
    x = torch.randn(2, 7, IN)
    assert torch.equal(net(x), nn.functional.linear(x, ad.base_weight(), ad.base_bias()))


@pytest.mark.parametrize("shape", [(3, 5, IN), (6, IN)])
@pytest.mark.parametrize("rank", [2, 4, 8])
@pytest.mark.parametrize("pairing", ["paired", "index"])
def test_n_equals_r_is_asylora_exactly(shape, rank, pairing):
    su, sa = build(rank=rank, num_subspaces=rank, init_weights=False, pairing=pairing)
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
    net, ad = build(init_weights=False, pairing="index")
    x = torch.randn(5, 6, IN)
    probs, idx, top_p = ad.route(x)
    ref = torch.softmax(x.mean(1) @ ad.router.T, -1)
    torch.testing.assert_close(probs, ref)
    expect = torch.topk(ref, 4).indices
    assert torch.equal(idx, expect.sort(-1).values)
    assert torch.equal(top_p, ref.gather(-1, idx))
    net(x)
    assert torch.equal(ad.last_selection, idx)
    _, ad2 = build(init_weights=False, subspace_order="score", pairing="index")
    assert torch.equal(ad2.route(x)[1], expect)  # score order keeps top-r order


def test_score_order_equals_its_formula():
    net, ad = build(init_weights=False, subspace_order="score", pairing="index")
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


@pytest.mark.parametrize("pairing", ["paired", "index"])
def test_straight_through_gradient_is_the_softmax_path(pairing):
    """With the balance loss off, ∂L/∂W_q flows only through the gate: dL/dp_{i_j} = <∂L/∂y, b_{i_j}> s (A x)_j
    (paired: (a_{i_j}ᵀ x)), summed over tokens."""
    net, ad = build(init_weights=False, balance_coef=0.0, pairing=pairing)
    net.train()
    x = torch.randn(2, 3, IN)
    g_out = torch.randn(2, 3, OUT)
    (net(x) * g_out).sum().backward()
    router = ad.router.detach().clone().requires_grad_(True)
    hbar = x.mean(1)
    probs = torch.softmax(hbar @ router.T, -1)
    idx = ad.route(x)[1]
    a = ad.lora_A.detach()
    h = torch.stack([x[b] @ (a[idx[b]] if pairing == "paired" else a).T for b in range(2)]) * ad.scaling  # (2, 3, r)
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
    with pytest.raises(ConfigError, match="pairing"):
        mms.config_for("sulora", pairing="rows")
    with pytest.raises(ConfigError, match="only applies to pairing='index'"):
        mms.config_for("sulora", subspace_order="score")
    with pytest.raises(ConfigError, match="a_init"):
        mms.config_for("sulora", a_init="xavier")
    with pytest.raises(ConfigError, match="router_temperature"):
        mms.config_for("sulora", router_temperature=0.0)
    cfg = mms.config_for("sulora", rank=4, rank_pattern={"proj": 6})
    assert cfg.subspaces_for(6) == 12


@pytest.mark.parametrize("pairing", ["paired", "index"])
def test_trainable_parameters_exclude_frozen_a(pairing):
    net, ad = build(rank=4, pairing=pairing)
    trainable, _ = mms.trainable_parameters(net)
    assert trainable == OUT * 8 + 8 * IN  # B bank (out, N) + router (N, in); A frozen — the same in both pairings
    counts = mms.parameter_counts(net)
    assert counts.trainable == trainable
    assert counts.stored - counts.trainable == ad.lora_A.numel() == (8 if pairing == "paired" else 4) * IN
