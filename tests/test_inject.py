"""The injector (mm_subspace.inject): target matching, freezing, several adapters, per-row routing (also through
sequence-first layers), merge (also exact, in half precision), adapter names, rollback of a failed inject or
load, mixed dtypes, the NaN guard, meta-device injection, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import mm_subspace as mms
import mm_subspace.atomic as atomic
from conftest import FEW, adapted, assert_unchanged, net, rss_bytes, snapshot
from mm_subspace.errors import AdapterFileError, AdapterStateError, ConfigError, MergeError, TargetError
from mm_subspace.inject import _RESERVED
from mm_subspace.io import CONFIG_NAME, WEIGHTS_NAME
from mm_subspace.layer import AdapterLayer, ModelState

pytestmark = pytest.mark.usefixtures("one_thread")


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


# -- per-row routing through sequence-first layers ---------------------------------------------------------------
def _routing_matches_single_runs(model: nn.Module, x: torch.Tensor, rows: list, batch_dim: int) -> None:
    with torch.no_grad():
        single = {}
        for name in ("a", "b"):
            mms.set_adapter(model, name)
            single[name] = model(x)
        with mms.disable_adapters(model):
            single[None] = model(x)
        with mms.forward_context(model, adapter_rows=rows):
            mixed = model(x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed.select(batch_dim, i), single[name].select(batch_dim, i), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single["a"], single["b"])


@pytest.mark.parametrize("batch_first", [False, True])
def test_routing_through_sequence_first_transformer_layer(batch_first):
    """nn.TransformerEncoderLayer(batch_first=False) feeds (seq, batch, d) to its linears; rows must
    still be routed by batch row, not by sequence position."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)).eval()
    for name, method in (("a", "moslora"), ("b", "lora")):
        torch.manual_seed(len(name) + ord(name))
        mms.inject(model, mms.config_for(method, rank=2, targets=["linear1", "linear2", "self_attn"], init_weights=False),
                   adapter_name=name)
    x = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(2))  # (seq 5, batch 4) or (batch 5, seq 4)
    rows = ["a", "b", None, "a"] if not batch_first else ["a", "b", None, "a", "b"]
    _routing_matches_single_runs(model, x, rows, batch_dim=0 if batch_first else 1)


def test_routing_through_open_clip_sequence_first_transformer():
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    model = nn.Sequential(Transformer(16, 2, 2, batch_first=False)).eval()  # takes (batch, seq, d), blocks see (seq, batch, d)
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        mms.inject(model, mms.LoraConfig(rank=2, targets=["c_fc", "c_proj", "attn"], init_weights=False), adapter_name=name)
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(2))
    _routing_matches_single_runs(model, x, ["a", "b", None], batch_dim=0)


def test_two_adapters_on_rows_of_one_batch_never_mix():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    torch.manual_seed(3)
    mms.inject(model, mms.MoSLoRAConfig(rank=4, alpha=8, targets="llama", init_weights=False), adapter_name="a")
    mms.inject(model, mms.LoraConfig(rank=4, alpha=8, targets="llama", init_weights=False), adapter_name="b")
    ids = torch.randint(0, 1000, (4, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        single = {}
        for name in ("a", "b"):
            mms.set_adapter(model, name)
            single[name] = model(ids).logits
        with mms.disable_adapters(model):
            single[None] = model(ids).logits
        rows = ["a", "b", None, "a"]
        with mms.forward_context(model, adapter_rows=rows):
            mixed = model(ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single["a"], single["b"])  # the adapters really differ


def test_thread_safety_is_documented():
    doc = ModelState.__doc__ or ""
    assert "Not thread-safe" in doc and "set_adapter" in doc and "one model per thread" in doc


# -- adapter names, and complete rollback of a failed inject or load ---------------------------------------------
names = st.sampled_from(sorted(_RESERVED)) | st.text(max_size=70)


@FEW
@given(name=names)
def test_inject_validates_the_name_before_touching_the_model(name):
    """A name that clashes with nn.ModuleDict (forward, keys, to, type, pop, ...) or is malformed is a
    ConfigError raised before the first layer is wrapped; a valid one works."""
    model = net()
    before = snapshot(model)
    try:
        mms.inject(model, mms.LoraConfig(rank=2, targets=["0", "2"]), adapter_name=name)
    except ConfigError as err:
        assert repr(name)[:20] in str(err) or "adapter name" in str(err)
        assert_unchanged(model, before)
    else:
        assert list(mms.list_adapters(model)) == [name] and len(list(mms.adapter_layers(model))) == 2


def test_reinjecting_the_same_name_is_refused():
    m = adapted()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(AdapterStateError, match="an adapter named 'default' already exists"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=["0"]))
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert list(mms.list_adapters(m)) == ["default"]


def test_failed_loads_restore_requires_grad_and_everything_else(tmp_path):
    """A load failing after injection (here: NaN tensors) leaves state dict, requires_grad flags, module
    tree and adapters identical — for load_adapter, import_peft and import_kohya, with and without other adapters."""
    source = adapted()
    mms.save_adapter(source, tmp_path / "ours")
    tensors = load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    tensors["2.lora_A"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "ours" / WEIGHTS_NAME))
    meta = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    meta["weights_sha256"] = atomic.sha256_file(tmp_path / "ours" / WEIGHTS_NAME)
    (tmp_path / "ours" / CONFIG_NAME).write_text(json.dumps(meta))
    lora = net()
    torch.manual_seed(5)
    mms.inject(lora, mms.LoraConfig(rank=2, targets=["0", "2"], init_weights=False))
    mms.export_peft(lora, tmp_path / "peft")
    peft_weights = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(str(peft_weights))
    t[next(iter(t))].fill_(float("inf"))
    save_file(t, str(peft_weights))
    kohya = {"lora_te1_0.lora_down.weight": torch.randn(2, 12), "lora_te1_0.lora_up.weight": torch.full((16, 2), float("nan"))}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    calls = [
        lambda m: mms.load_adapter(m, tmp_path / "ours"),
        lambda m: mms.import_peft(m, tmp_path / "peft", adapter_name="p"),
        lambda m: mms.import_kohya(tmp_path / "k.safetensors", text_encoder=m, adapter_name="k"),
    ]
    for call in calls:
        for setup in ("plain", "with another adapter", "half frozen"):
            model = net()
            if setup == "with another adapter":
                mms.inject(model, mms.MoSLoRAConfig(rank=2, targets=["0"]), adapter_name="keep")
            elif setup == "half frozen":
                model[0].weight.requires_grad_(False)
            before = snapshot(model)
            with pytest.raises(AdapterFileError, match="NaN or inf"):
                call(model)
            assert_unchanged(model, before)


# -- adapters sharing trainable_modules --------------------------------------------------------------------------
def head_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6), nn.LayerNorm(6))


def test_second_adapter_training_the_same_module_is_refused(tmp_path):
    """Two adapters training one module in place would overwrite each other: refused, up front."""
    model = head_net()
    mms.inject(model, mms.LoraConfig(rank=2, targets=["0"], trainable_modules=["3"]), adapter_name="a")
    before = snapshot(model)
    with pytest.raises(AdapterStateError, match=r"lists trainable_modules \['3'\] that adapter 'a' already trains"):
        mms.inject(model, mms.LoraConfig(rank=2, targets=["2"], trainable_modules=["3"]), adapter_name="b")
    assert_unchanged(model, before)
    # the same through load_adapter (b saved from another model)
    other = head_net()
    mms.inject(other, mms.LoraConfig(rank=2, targets=["2"], trainable_modules=["3"]), adapter_name="b")
    mms.save_adapter(other, tmp_path / "b", adapter_name="b")
    with pytest.raises(AdapterStateError, match="already trains"):
        mms.load_adapter(model, tmp_path / "b")
    assert_unchanged(model, before)
    # disjoint trainable modules are fine; routing rows across them is refused (every row would share them)
    mms.inject(model, mms.LoraConfig(rank=2, targets=["2"]), adapter_name="c")
    with pytest.raises(AdapterStateError, match="per-row routing cannot give each row its own"):
        with mms.forward_context(model, adapter_rows=["a", "c", None]):
            pass


# -- exact merge/unmerge in half precision -----------------------------------------------------------------------
X12 = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))  # input of conftest.net


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_merge_unmerge_round_trips_bit_for_bit(method, dtype):
    """merge(exact=True) keeps the base weights; 100 merge/unmerge cycles change no bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6, bias=False)).to(dtype)
    mms.inject(model, mms.config_for(method, rank=4, alpha=8, targets=["0", "2"], init_weights=False))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = X12.to(dtype)
    with torch.no_grad():
        unmerged_out = model(x)
        for _ in range(100):
            mms.merge(model, exact=True)
            mms.unmerge(model)
        merged_again = None
        mms.merge(model, exact=True)
        merged_again = model(x)
        mms.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base), "exact unmerge must restore every bit"
    torch.testing.assert_close(merged_again.float(), unmerged_out.float(), atol=0.05, rtol=0.05)
    # the default (no copy kept) is documented as drifting by rounding in half precision
    assert "ulp" in (mms.merge.__doc__ or "")


# -- mixed dtypes, and nn.TransformerEncoderLayer's fast path ----------------------------------------------------
@pytest.mark.parametrize("base_dtype,adapter_dtype", [
    (torch.float16, "float32"), (torch.bfloat16, "float32"), (torch.float32, "bfloat16"), (torch.float32, "float16"),
])
def test_mixed_dtypes_give_the_base_dtype(base_dtype, adapter_dtype):
    torch.manual_seed(0)
    base = nn.Linear(12, 16)
    m = nn.Sequential(nn.Linear(12, 16).to(base_dtype))
    m[0].load_state_dict({k: v.to(base_dtype) for k, v in base.state_dict().items()})
    mms.inject(m, mms.MoSLoRAConfig(rank=4, alpha=8, targets=["0"], init_weights=False, dtype=adapter_dtype))
    adapter = m[0].adapters["default"]
    assert adapter.lora_A.dtype == getattr(torch, adapter_dtype)
    x = X12.to(base_dtype)
    out = m(x)
    assert out.dtype == base_dtype
    a, mix, b = (t.float() for t in (adapter.lora_A, adapter.mixer, adapter.lora_B))
    w, bias = (t.float() for t in (m[0].base_layer.weight, m[0].base_layer.bias))
    expected = x.float() @ w.T + bias + adapter.scaling * x.float() @ a.T @ mix.T @ b.T
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert adapter.lora_A.grad is not None and adapter.lora_A.grad.dtype == adapter.lora_A.dtype


def test_transformer_encoder_layer_fast_path_does_not_skip_adapters():
    """Found with the sequence-first routing tests: in eval + no_grad, nn.TransformerEncoderLayer(batch_first=True)
    runs a fused kernel on the raw weights of its linears (adapters silently skipped) and reads MHA attributes our
    wrapper lacked (crash)."""
    torch.manual_seed(0)
    for targets in (["linear1", "linear2"], ["linear1", "self_attn"]):
        model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
        mms.inject(model, mms.LoraConfig(rank=2, targets=targets, init_weights=False))
        x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
        with_grad = model(x).detach()
        with torch.no_grad():
            fast = model(x)
            with mms.disable_adapters(model):
                base = model(x)
        torch.testing.assert_close(fast, with_grad)
        assert not torch.allclose(fast, base)


# -- meta-device injection allocates nothing ---------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
def test_meta_llama3_8b_injection_allocates_nothing():
    from transformers import LlamaForCausalLM

    from mm_subspace.tiny_models import llama3_8b_config

    start = rss_bytes()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama3_8b_config())
    mms.inject(model, mms.MoSLoRAConfig(rank=16, alpha=32, targets="llama_moslora"))
    not_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if not p.is_meta]
    assert not not_meta, f"left the meta device: {not_meta[:5]}"
    grown = rss_bytes() - start
    assert grown < 100 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB for a meta-device 8B model"
    assert mms.trainable_parameters(model)[0] == 28_352_512  # MoSLoRA Table 4: 28.4M
