"""Extension-based methods (survey §4): TriLoRA, FLoRA, parallel and bottleneck adapters; save/load for all our methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError, MergeError

IN, OUT = 10, 7


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, OUT)
        self.head = nn.Linear(OUT, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)))


def build(method: str, seed: int = 0, **kwargs) -> tuple[Net, nn.Module]:
    torch.manual_seed(seed)
    net = Net()
    kwargs.setdefault("rank", 3)
    kwargs.setdefault("alpha", 6.0)
    mms.inject(net, mms.config_for(method, targets=["fc"], **kwargs))
    return net, net.fc.adapters["default"]


def formula(method: str, ad: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each method's output of the wrapped layer, written out by hand (s = alpha/r = 2)."""
    A, B, s = ad.lora_A, ad.lora_B, 2.0
    y = x @ ad.base_weight().T + ad.base_bias()
    if method == "trilora":
        return y + s * x @ (B @ torch.diag(ad.lora_E) @ A).T
    if method == "flora":
        return y + s * x @ (B @ ad.mixer @ A).T
    if method == "parallel_adapter":
        return y + s * torch.relu(x @ A.T) @ B.T
    if method == "bottleneck_adapter":
        return y + s * torch.relu(y @ A.T) @ B.T
    raise AssertionError(method)


EXTENSIONS = ["trilora", "flora", "parallel_adapter", "bottleneck_adapter"]
OURS = ["asylora", "sulora", *EXTENSIONS]


@pytest.mark.parametrize("method", EXTENSIONS)
def test_forward_equals_formula(method):
    net, ad = build(method, init_weights=False)
    x = torch.randn(4, 5, IN)
    torch.testing.assert_close(net.fc(x), formula(method, ad, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", EXTENSIONS)
def test_step0_is_base_and_gradients_flow(method):
    net, ad = build(method)
    x = torch.randn(8, IN)
    assert torch.equal(net.fc(x), net.fc.base_layer(x))
    net(x).square().sum().backward()
    trainable = {n: p for n, p in ad.named_parameters() if p.requires_grad}
    # the zero-initialised part (core e / G, or B) must get gradient at step 0, else nothing ever trains
    zero_init = {"trilora": "lora_E", "flora": "mixer"}.get(method, "lora_B")
    assert trainable[zero_init].grad.abs().sum() > 0
    assert ad.state_dict()[zero_init].abs().sum() == 0


def test_core_methods_keep_b_nonzero():
    for method in ("trilora", "flora"):
        _, ad = build(method)
        assert ad.lora_B.abs().sum() > 0 and ad.lora_A.abs().sum() > 0


def test_trilora_gradient_of_core_by_hand():
    """∂L/∂e_i = s · Σ_n (Bᵀ g_n)_i (A x_n)_i at step 0."""
    net, ad = build("trilora")
    x, g = torch.randn(5, IN), torch.randn(5, OUT)
    (net.fc(x) * g).sum().backward()
    ref = 2.0 * ((g @ ad.lora_B.detach()) * (x @ ad.lora_A.detach().T)).sum(0)
    torch.testing.assert_close(ad.lora_E.grad, ref)


@pytest.mark.parametrize("method", ["trilora", "flora"])
def test_merge_and_plain_lora_export(method):
    net, ad = build(method, init_weights=False)
    x = torch.randn(3, IN)
    y = net(x)
    down, up, scaling = mms.lora_factors(net)["fc"]
    torch.testing.assert_close(scaling * up @ down, ad.delta_weight())
    torch.testing.assert_close(ad.delta_weight(), formula(method, ad, torch.eye(IN)).T - ad.base_weight() - ad.base_bias()[:, None])
    mms.merge(net)
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)
    mms.unmerge(net)
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["parallel_adapter", "bottleneck_adapter"])
def test_adapters_refuse_merge_and_export(method):
    net, _ = build(method, init_weights=False)
    with pytest.raises(MergeError, match="σ"):
        mms.merge(net)
    with pytest.raises(MergeError, match="σ"):
        mms.lora_factors(net)


def test_bottleneck_reads_the_output():
    _, ad = build("bottleneck_adapter")
    assert ad.lora_A.shape == (3, OUT) and ad.lora_B.shape == (OUT, 3)


@pytest.mark.parametrize("act", ["gelu", "silu", "tanh"])
def test_parallel_adapter_activation_is_configurable(act):
    net, ad = build("parallel_adapter", init_weights=False, activation=act)
    x = torch.randn(4, IN)
    fn = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[act]
    ref = x @ ad.base_weight().T + ad.base_bias() + 2.0 * fn(x @ ad.lora_A.T) @ ad.lora_B.T
    torch.testing.assert_close(net.fc(x), ref)
    with pytest.raises(ConfigError, match="activation"):
        mms.config_for("parallel_adapter", activation="swish2")


@pytest.mark.parametrize("method", OURS)
def test_save_load_round_trip_is_bit_exact(method, tmp_path):
    net, _ = build(method, init_weights=False)
    with torch.no_grad():  # move every parameter off its init, as after training
        for p in net.fc.adapters["default"].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 6, IN)
    y = net(x)
    mms.save_adapter(net, tmp_path / "ad")
    fresh = Net()
    fresh.load_state_dict({k.replace("fc.base_layer.", "fc."): v for k, v in net.state_dict().items() if "adapters" not in k})
    mms.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(x), y)
    saved, loaded = mms.adapter_state_dict(net), mms.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    frozen = {n for n, p in fresh.named_parameters() if not p.requires_grad and "adapters" in n}
    assert frozen == {n for n, p in net.named_parameters() if not p.requires_grad and "adapters" in n}


COUNTS_4096_R8 = {  # analytic counts for one 4096×4096 layer at r = 8 (README table)
    "asylora": 8 * 4096,  # B only (freeze="A"); A only with freeze="B": also 8·4096
    "sulora": 16 * 4096 + 16 * 4096,  # bank (out, N=2r) + router (N, in); A frozen
    "trilora": 8 * (4096 + 4096) + 8,  # A, B, e
    "flora": 8 * (4096 + 4096) + 8 * 8,  # A, B, G
    "parallel_adapter": 8 * (4096 + 4096),
    "bottleneck_adapter": 8 * 4096 + 4096 * 8,  # A (r, out), B (out, r)
    "lora": 8 * (4096 + 4096),  # with any mpc: MPC adds no parameters
}


@pytest.mark.parametrize("method", sorted(COUNTS_4096_R8))
def test_trainable_counts_for_a_4096_layer_at_rank_8(method):
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    extra = {"mpc": "orthogonal"} if method == "lora" else {}
    mms.inject(net, mms.config_for(method, rank=8, targets=["0"], **extra))
    assert mms.trainable_parameters(net)[0] == COUNTS_4096_R8[method]
