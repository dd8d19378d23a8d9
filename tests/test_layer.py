"""The A·M·B layer: LoRA, MoSLoRA and TS-Mixing against their closed forms (MoSLoRA Eq. 5-7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from conftest import single_adapter_runs
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
    with pytest.raises(ConfigError, match="mixer_init.*'xavier'"):
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


def test_adapters_injected_into_an_eval_model_are_in_eval_mode():
    """No adapter dropout in a model put in eval mode before the adapter was injected (or loaded)."""
    model = _net().eval()
    mms.inject(model, mms.LoraConfig(rank=4, dropout=0.5, targets=["0"], init_weights=False))
    assert not model[0].training and not _adapter(model).training
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), model(x))
    model.train()
    assert _adapter(model).training


# -- per-row routing: stacked (one batched matmul) vs the adapters' own forwards ----------------------------
STACKABLE = ("lora", "moslora", "ts_mixing", "asylora", "trilora", "flora")


def _routed_net(methods: list[str], seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The two-layer net with one adapter per entry of ``methods`` (ranks 2, 4, 6, ...; scales 1, 0.5, 1.5, ...)."""
    model = _net(seed).eval()
    names = []
    for i, method in enumerate(methods):
        name = f"{method}{i}"
        torch.manual_seed(100 + i)
        mms.inject(model, mms.config_for(method, rank=2 * (i % 4 + 1), alpha=4, targets=["0", "2"], init_weights=False), name)
        mms.set_scale(model, name, (1.0, 0.5, 1.5, 2.0)[i % 4])
        names.append(name)
    _randomise_cores(model)
    return model, names


def _randomise_cores(model: nn.Module) -> None:
    """TriLoRA/FLoRA cores start at zero: draw them so every adapter really moves its rows."""
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(model):
            for name in ("lora_E", "mixer"):
                tensor = getattr(adapter, name, None)
                if isinstance(tensor, nn.Parameter) and not tensor.any():
                    tensor.normal_(0, 0.5)


def _count_stacked(monkeypatch) -> list[int]:
    from mm_subspace.layer import AdapterLayer

    calls, original = [], AdapterLayer._stacked_forward
    monkeypatch.setattr(AdapterLayer, "_stacked_forward", lambda self, *a: calls.append(1) or original(self, *a))
    return calls


def _stacked_calls_of_routing(model: nn.Module, x: torch.Tensor, rows: list, monkeypatch) -> int:
    """Route ``x`` by ``rows`` (no autograd), check it equals the single-adapter runs; how often the stacked path ran."""
    with torch.no_grad():
        expected = single_adapter_runs(model, x, rows)
    calls = _count_stacked(monkeypatch)
    with torch.no_grad(), mms.forward_context(model, adapter_rows=rows):
        routed = model(x)
    torch.testing.assert_close(routed, expected)
    return len(calls)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("method", STACKABLE)
def test_stacked_routing_equals_single_adapter_runs(method, k, monkeypatch):
    """K adapters of mixed ranks and scales plus base rows, one routed call = K + 1 separate runs, row by row."""
    model, names = _routed_net([method] * k)
    rows = [*names, None, names[0]]
    x = torch.randn(len(rows), 5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = single_adapter_runs(model, x, rows)
    calls = _count_stacked(monkeypatch)
    with torch.no_grad(), mms.forward_context(model, adapter_rows=rows):
        routed = model(x)
        again = model(x)  # from the cached stacked factors
    with mms.forward_context(model, adapter_rows=rows):
        with_grad = model(x)  # autograd on: stacked afresh, not cached
    assert len(calls) == 6  # both adapted layers, every call: the stacked path, never the per-adapter loop
    torch.testing.assert_close(routed, expected)
    assert torch.equal(again, routed)
    torch.testing.assert_close(with_grad, expected)
    assert torch.equal(routed[k], model[2].base_layer(model[1](model[0].base_layer(x[k]))))  # the base row is exact


def test_stacked_routing_follows_weight_scale_and_dtype_changes():
    """The cached stacked factors are refreshed by an in-place weight update, set_scale and .double()."""
    model, names = _routed_net(["lora", "moslora"])
    rows = [names[1], None, names[0]]
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mms.forward_context(model, adapter_rows=rows):
        before = model(x)
        model[0].adapters[names[0]].lora_B.mul_(-2.0)  # what an optimizer step or load_adapter does
        mms.set_scale(model, names[1], 3.0)
        after = model(x)
    with torch.no_grad():
        torch.testing.assert_close(after, single_adapter_runs(model, x, rows))
    assert not torch.allclose(after[0], before[0]) and not torch.allclose(after[2], before[2])
    model.double()
    with torch.no_grad(), mms.forward_context(model, adapter_rows=rows):
        doubled = model(x.double())
    assert doubled.dtype == torch.float64
    torch.testing.assert_close(doubled.float(), after)
    with torch.inference_mode(), mms.forward_context(model, adapter_rows=rows):
        assert torch.equal(model(x.double()), doubled)
    # a write through .data is invisible to the version counter: clear_routing_cache() makes it count
    with torch.no_grad(), mms.forward_context(model, adapter_rows=rows):
        model(x.double())  # cached without inference_mode
    model[0].adapters[names[0]].lora_B.data.mul_(0.0)
    model[0].clear_routing_cache()
    with torch.no_grad():
        expected = single_adapter_runs(model, x.double(), rows)
        with mms.forward_context(model, adapter_rows=rows):
            torch.testing.assert_close(model(x.double()), expected)


def test_stacked_routing_gradients_equal_the_per_adapter_loop(monkeypatch):
    """With autograd on (eval mode), the stacked path gives every adapter the gradient the per-adapter loop gives."""
    from mm_subspace.layer import AdapterLayer

    model, names = _routed_net(["lora", "moslora", "trilora"])
    rows = [names[2], None, *names]
    x = torch.randn(len(rows), 3, 12, generator=torch.Generator().manual_seed(8))
    params = [p for _, a in mms.iter_adapters(model) for p in a.parameters()]
    grads = {}
    for stacked in (True, False):
        monkeypatch.setattr(AdapterLayer, "stacked_routing", stacked)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with mms.forward_context(model, adapter_rows=rows):
            model(x).pow(2).sum().backward()
        grads[stacked] = [p.grad.clone() for p in params]
    for g_stacked, g_loop in zip(grads[True], grads[False]):
        torch.testing.assert_close(g_stacked, g_loop)
    assert all(g.abs().sum() > 0 for g in grads[True])


def test_routing_mixes_stacked_and_own_forward_adapters(monkeypatch):
    """DoRA and SuLoRA cannot be stacked: their rows go through their own forward, the others' through one bmm."""
    model, names = _routed_net(["lora", "dora", "moslora", "sulora", "trilora"])
    assert [model[0].adapters[n].can_stack() for n in names] == [True, False, True, False, True]
    rows = [names[3], *names, None, names[1]]
    x = torch.randn(len(rows), 4, 12, generator=torch.Generator().manual_seed(4))
    assert _stacked_calls_of_routing(model, x, rows, monkeypatch) == 2  # once per adapted layer


def test_routing_in_training_mode_runs_each_adapters_own_forward(monkeypatch):
    """Training keeps the per-adapter forward (dropout, MPC penalties): the stacked path is for eval only."""
    model, names = _routed_net(["lora", "moslora"])
    rows = [*names, None]
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = single_adapter_runs(model, x, rows)
    calls = _count_stacked(monkeypatch)
    model.train()
    with mms.forward_context(model, adapter_rows=rows):
        routed = model(x)
    assert not calls
    torch.testing.assert_close(routed, expected)


class _SeqFirst(nn.Module):
    """A block that feeds (seq, batch, d) to its linears, as ``nn.Transformer(batch_first=False)`` does."""

    batch_first = False

    def __init__(self) -> None:
        super().__init__()
        self.inner = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


def test_stacked_routing_in_a_sequence_first_block(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(_SeqFirst()).eval()
    names = ["a", "b", "c"]
    for i, (name, method) in enumerate(zip(names, ("lora", "moslora", "ts_mixing"))):
        torch.manual_seed(i)
        mms.inject(model, mms.config_for(method, rank=2 + 2 * i, targets=["inner.0", "inner.2"], init_weights=False), name)
    assert model[0].inner[0].batch_dim == 1
    rows = ["b", None, "a", "c"]
    x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(6))  # (batch, seq, d); the linears see (seq, batch, d)
    assert _stacked_calls_of_routing(model, x, rows, monkeypatch) == 2  # once per adapted layer


def test_stacked_routing_op_count_does_not_grow_with_k():
    """One gather + two batched matmuls per layer whatever the number of adapters (cached factors, no autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = {}
    for k in (2, 8):
        model, names = _routed_net(["lora", "moslora"] * (k // 2))
        layer = model[0]
        x = torch.randn(k + 1, 12, generator=torch.Generator().manual_seed(7))
        with torch.no_grad(), mms.forward_context(model, adapter_rows=[*names, None]):
            layer(x)  # fills the cache
            with Count() as count:
                layer(x)
        counts[k] = count.ops
    assert counts[2] == counts[8]
    assert len(counts[8]) <= 10, counts[8]
