"""The injector: target matching, freezing, several adapters, routing, merge, and every error path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import AdapterStateError, ConfigError, MergeError, TargetError
from mm_subspace.layer import AdapterLayer


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(16)
        self.out = nn.ModuleList([nn.Linear(8, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[0](self.v_proj(self.norm(self.q_proj(x))))


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


X = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(7))


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, _ in mms.adapter_layers(model)]


def test_targets_by_suffix_exact_name_and_regex():
    m = Net()
    mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj", "layers.1.v_proj"]))
    assert _wrapped(m) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]
    m = Net()
    mms.inject(m, mms.LoraConfig(rank=2, targets=r"layers\.0\..*_proj"))
    assert _wrapped(m) == ["layers.0.q_proj", "layers.0.v_proj"]
    m = Net()
    mms.inject(m, mms.LoraConfig(rank=2, targets=["out.0"]))
    assert _wrapped(m) == ["layers.0.out.0", "layers.1.out.0"]


def test_base_is_frozen_and_counts_are_reported():
    m = Net()
    total_before = sum(p.numel() for p in m.parameters())
    mms.inject(m, mms.MoSLoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    trainable, total = mms.trainable_parameters(m)
    # per layer: q 2*(16+16)+4, v 2*(16+8)+4 ; two blocks
    assert trainable == 2 * ((64 + 4) + (48 + 4))
    assert total == total_before + trainable
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".adapters." not in n)
    line = mms.print_trainable_parameters(m)
    assert f"trainable params: {trainable:,d}" in line


def test_unknown_target_names_the_module_and_suggests():
    m = Net()
    with pytest.raises(TargetError, match=r"'q_prj' matched no module.*did you mean 'q_proj'"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=["q_prj"]))
    with pytest.raises(TargetError, match="matched no module"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=r"nothing.*"))
    assert not _wrapped(m)


def test_unsupported_layer_type_is_refused_with_alternatives():
    m = Net()
    with pytest.raises(TargetError, match=r"'layers.0.norm' is a LayerNorm.*cannot wrap"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj", "layers.0.norm"]))
    with pytest.raises(TargetError, match=r"ModuleList.*e\.g\. 'layers.0.out.0'"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=["layers.0.out"]))
    assert not _wrapped(m), "a failed inject must not leave a half-injected model"


def test_rank_checks():
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        mms.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        mms.MoSLoRAConfig(rank=-3)
    m = Net()
    with pytest.raises(TargetError, match=r"rank 9 is larger than min\(in, out\) = min\(16, 8\) of module 'layers.0.v_proj'.*rank <= 8"):
        mms.inject(m, mms.LoraConfig(rank=9, targets=["q_proj", "v_proj"]))
    assert not _wrapped(m)
    # a per-module override makes it valid
    mms.inject(m, mms.LoraConfig(rank=9, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}))
    assert m.layers[0].v_proj.adapters["default"].rank == 8
    assert m.layers[0].q_proj.adapters["default"].rank == 9


def test_duplicate_adapter_name_is_refused():
    m = Net()
    mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(AdapterStateError, match="'default' already exists.*remove_adapter"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(ConfigError, match="config must be an AdapterConfig"):
        mms.inject(m, {"method": "lora"}, "other")
    with pytest.raises(ConfigError, match="unknown adapter method 'mosloRA'.*Did you mean 'moslora'"):
        mms.config_for("mosloRA")


def test_several_adapters_switch_disable_remove():
    m = Net()
    base = m(X)
    mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj"], init_weights=False), "a")
    mms.inject(m, mms.MoSLoRAConfig(rank=2, targets=["q_proj", "v_proj"], init_weights=False), "b")
    assert mms.active_adapters(m) == ["a"]
    out_a = m(X)
    mms.set_adapter(m, "b")
    out_b = m(X)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    # only the active adapter trains
    grads = {n for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(".adapters.b." in n for n in grads)
    with mms.disable_adapters(m):
        assert torch.equal(m(X), base)
    assert torch.equal(m(X), out_b)
    mms.set_adapter(m, ["a", "b"])  # stacked: both updates apply
    assert not torch.allclose(m(X), out_b)
    mms.remove_adapter(m, "b")
    assert _wrapped(m) == ["layers.0.q_proj", "layers.1.q_proj"]  # v_proj had only b: unwrapped
    mms.set_adapter(m, "a")
    torch.testing.assert_close(m(X), out_a)
    mms.remove_adapter(m, "a")
    assert not _wrapped(m) and torch.equal(m(X), base)
    with pytest.raises(AdapterStateError, match="no mm_subspace adapters"):
        mms.set_adapter(m, "a")


def test_set_scale_scales_the_update():
    m = Net()
    base = m(X)
    mms.inject(m, mms.LoraConfig(rank=2, targets=["layers.1.out.0"], init_weights=False))
    full = m(X)
    mms.set_scale(m, "default", 0.5)
    torch.testing.assert_close(m(X), base + 0.5 * (full - base))
    mms.set_scale(m, "default", 0.0)
    torch.testing.assert_close(m(X), base)


def test_per_row_routing_equals_separate_runs():
    m = Net()
    mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj"], init_weights=False), "a")
    mms.inject(m, mms.MoSLoRAConfig(rank=2, targets=["v_proj"], init_weights=False), "b")
    x = X[:3]
    singles = []
    for name in ("a", "b", None):
        if name is None:
            with mms.disable_adapters(m):
                singles.append(m(x))
        else:
            mms.set_adapter(m, name)
            singles.append(m(x))
    # row i of a batch of 3 copies goes through adapter rows[i]; doubling (CFG) tiles the pattern
    batch = torch.cat([x[:1], x[:1], x[:1], x[:1], x[:1], x[:1]])
    with mms.forward_context(m, adapter_rows=["a", "b", None]):
        routed = m(batch)
    for i in range(6):
        torch.testing.assert_close(routed[i], singles[i % 3][0])
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        with mms.forward_context(m, adapter_rows=["a", "zzz"]):
            pass
    with pytest.raises(AdapterStateError, match="not a multiple"):
        with mms.forward_context(m, adapter_rows=["a", "b"]):
            m(X[:3])


def test_merge_unmerge_round_trip():
    m = Net()
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    mms.inject(m, mms.MoSLoRAConfig(rank=4, targets=["q_proj", "v_proj", "out.0"], init_weights=False))
    unmerged = m(X)
    mms.merge(m)
    assert m.layers[0].q_proj.merged == ["default"]
    torch.testing.assert_close(m(X), unmerged, rtol=1e-5, atol=1e-5)
    with mms.forward_context(m):  # merged layers are not applied twice
        torch.testing.assert_close(m(X), unmerged, rtol=1e-5, atol=1e-5)
    mms.unmerge(m)
    for name, param in m.named_parameters():
        if ".adapters." not in name:
            torch.testing.assert_close(param, weights[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    torch.testing.assert_close(m(X), unmerged)
    plain = mms.merge_and_unload(m)
    assert not _wrapped(plain) and all(type(mod) is nn.Linear for mod in [plain.layers[0].q_proj])
    torch.testing.assert_close(plain(X), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_refusal_leaves_weights_untouched():
    from mm_subspace.layer import LowRankAdapter

    class Routed(LowRankAdapter):
        mergeable = False
        merge_refusal = "its B depends on the input"

    m = Net()
    mms.inject(m, mms.LoraConfig(rank=2, targets=["q_proj"], init_weights=False))
    before = m.layers[0].q_proj.base_layer.weight.clone()
    m.layers[1].q_proj.adapters["default"].__class__ = Routed
    with pytest.raises(MergeError, match="its B depends on the input"):
        mms.merge(m)
    assert torch.equal(m.layers[0].q_proj.base_layer.weight, before)
    assert m.layers[0].q_proj.merged == []


def test_meta_device_llama3_8b_counts_match_moslora_table_4():
    """MoSLoRA Table 4: LoRA r=16 on q,k,v,up,down of LLaMA-3-8B trains 28.3M; MoSLoRA 28.4M."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    counts = {}
    for method in ("lora", "moslora"):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        mms.inject(model, mms.config_for(method, rank=16, alpha=32, targets="llama_moslora"))
        counts[method] = mms.trainable_parameters(model)[0]
        assert all(p.is_meta for p in model.parameters())
        assert sum(isinstance(mod, AdapterLayer) for mod in model.modules()) == 32 * 5
    assert counts["lora"] == 28_311_552
    assert counts["moslora"] - counts["lora"] == 40_960  # r² per layer: 256 × 5 × 32
