"""Fused q/k/v projections (timm ``Attention.qkv``, ``nn.MultiheadAttention``): per-slice adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError, MergeError, TargetError
from mm_subspace.fused import FusedAdapter, MultiheadAttentionLayer
from mm_subspace.tiny_models import tiny_open_clip_vit, tiny_timm_vit

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["lora", "moslora"]


def _config(method: str, **kw):
    return mms.config_for(method, rank=4, alpha=8, init_weights=False, **kw)


class SplitQKV(nn.Module):
    """Hand-built reference: separate q, k, v Linears carrying the rows of a fused weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: str = "qkv") -> None:
        super().__init__()
        d = weight.shape[1]
        for i, name in enumerate(parts):
            lin = nn.Linear(d, d, bias=bias is not None)
            with torch.no_grad():
                lin.weight.copy_(weight[i * d : (i + 1) * d])
                if bias is not None:
                    lin.bias.copy_(bias[i * d : (i + 1) * d])
            setattr(self, name, lin)

    def forward(self, x):  # unused: the test calls the projections one by one
        raise RuntimeError


def _copy_slices(fused: FusedAdapter, reference: nn.Module, slices: str) -> None:
    """Give the reference's separate adapters the fused slice adapters' tensors."""
    with torch.no_grad():
        for s in slices:
            target = dict(mms.iter_adapters(reference))[s]
            target.load_state_dict(fused.parts[s].state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_timm_qkv_q_v_equals_separate_linears(method):
    torch.manual_seed(0)
    model = tiny_timm_vit()
    qkv = model.blocks[0].attn.qkv
    reference = SplitQKV(qkv.weight.detach(), qkv.bias.detach())
    mms.inject(model, _config(method, targets=["blocks.0.attn.qkv"], fused_slices={"qkv": "q,v"}))
    mms.inject(reference, _config(method, targets=["q", "v"]))
    fused = model.blocks[0].attn.qkv.adapters["default"]
    assert isinstance(fused, FusedAdapter) and list(fused.parts) == ["q", "v"]
    _copy_slices(fused, reference, "qv")
    x = torch.randn(2, 5, 64)
    out = model.blocks[0].attn.qkv(x)
    expected = torch.cat([reference.q(x), reference.k(x), reference.v(x)], -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the k slice is untouched: exactly the base rows
    torch.testing.assert_close(out[..., 64:128], F.linear(x, qkv.weight[64:128], qkv.bias[64:128]))
    # merge equals unmerged, unmerge restores the fused weight
    w0 = qkv.weight.detach().clone()
    mms.merge(model)
    torch.testing.assert_close(model.blocks[0].attn.qkv(x), expected, rtol=1e-5, atol=1e-5)
    merged = qkv.weight.detach()
    torch.testing.assert_close(merged[64:128], w0[64:128])  # k rows unchanged by the merge
    torch.testing.assert_close(merged[:64], w0[:64] + dict(mms.iter_adapters(reference))["q"].delta_weight().detach())
    mms.unmerge(model)
    torch.testing.assert_close(qkv.weight.detach(), w0, rtol=0, atol=1e-6)


def _manual_attention(x, q, k, v, o, heads):
    batch, seq, d = x.shape
    split = lambda t: t.view(batch, seq, heads, d // heads).transpose(1, 2)  # noqa: E731
    att = F.scaled_dot_product_attention(split(q(x)), split(k(x)), split(v(x)))
    return o(att.transpose(1, 2).reshape(batch, seq, d))


@pytest.mark.parametrize("method", METHODS)
def test_open_clip_mha_q_v_equals_separate_linears(method):
    torch.manual_seed(0)
    vit = tiny_open_clip_vit()
    mha = vit.transformer.resblocks[0].attn
    assert isinstance(mha, nn.MultiheadAttention) and mha.batch_first
    reference = SplitQKV(mha.in_proj_weight.detach(), mha.in_proj_bias.detach())
    reference.o = nn.Linear(64, 64)
    reference.o.load_state_dict(mha.out_proj.state_dict())
    mms.inject(vit, _config(method, targets=["transformer.resblocks.0.attn"], fused_slices={"attn": ["q", "v"]}))
    mms.inject(reference, _config(method, targets=["q", "v"]))
    layer = vit.transformer.resblocks[0].attn
    assert isinstance(layer, MultiheadAttentionLayer)
    _copy_slices(layer.adapters["default"], reference, "qv")
    x = torch.randn(2, 5, 64)
    expected = _manual_attention(x, reference.q, reference.k, reference.v, reference.o, mha.num_heads)
    out, weights = layer(x, x, x, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out_w, weights = layer(x, x, x)  # need_weights=True path: explicit softmax
    torch.testing.assert_close(out_w, expected, rtol=1e-5, atol=1e-5)
    assert weights.shape == (2, 5, 5)
    # merge into in_proj_weight: the stock MHA forward then gives the adapted output
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    mms.merge(vit)
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mha.out_proj.weight.detach(), w_out)  # o not adapted here
    mms.unmerge(vit)
    torch.testing.assert_close(mha.in_proj_weight.detach(), w_in, rtol=0, atol=1e-6)


def test_mha_default_slices_include_out_proj_and_whole_model_step0(tmp_path):
    torch.manual_seed(0)
    vit = tiny_open_clip_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = vit(images)
    mms.inject(vit, mms.MoSLoRAConfig(rank=4, alpha=8, targets="open_clip"))
    adapter = vit.transformer.resblocks[1].attn.adapters["default"]
    assert list(adapter.parts) == ["q", "k", "v", "o"]
    with torch.no_grad():
        torch.testing.assert_close(vit(images), base, rtol=1e-5, atol=1e-5)  # re-implemented attention = torch's
    # out_proj is adapted for real (wrapping it alone would be ignored by the MHA): change B of o only
    with torch.no_grad():
        adapter.parts["o"].lora_B.normal_()
        adapted = vit(images)
        assert not torch.allclose(adapted, base)
    mms.save_adapter(vit, tmp_path)
    fresh = tiny_open_clip_vit()
    mms.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), adapted, rtol=0, atol=0)
        mms.merge(fresh)  # o slice merged into out_proj.weight, read by the stock MHA forward
        torch.testing.assert_close(mms.unload(fresh)(images), adapted, rtol=1e-5, atol=1e-5)


def test_mha_masks_match_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=False)
    holder = nn.Sequential(mha)
    x = torch.randn(6, 2, 32)  # (seq, batch, d): batch_first=False
    pad = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    float_mask = torch.randn(2 * 4, 6, 6)
    float_pad = torch.zeros(2, 6).masked_fill(pad, float("-inf"))
    cases = [dict(key_padding_mask=pad), dict(attn_mask=causal), dict(attn_mask=float_mask, key_padding_mask=float_pad)]
    expected = [mha(x, x, x, average_attn_weights=False, **c) for c in cases]
    mms.inject(holder, mms.LoraConfig(rank=2, targets=["0"]))  # B = 0: adapted path, same math
    assert isinstance(holder[0], MultiheadAttentionLayer)
    for case, (out, weights) in zip(cases, expected):
        got, got_w = holder[0](x, x, x, average_attn_weights=False, **case)
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_w, weights, rtol=1e-5, atol=1e-5)


def test_fused_save_load_and_plain_lora_export(tmp_path):
    torch.manual_seed(0)
    model = tiny_timm_vit()
    mms.inject(model, _config("moslora", targets="timm_vit"))
    config = mms.list_adapters(model)["default"]
    assert config.fused_slices == {r"attn\.qkv": ["q", "k", "v"]}  # the preset's default, stored
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
    mms.save_adapter(model, tmp_path / "ours")
    keys = mms.adapter_state_dict(model)
    assert "blocks.0.attn.qkv.parts.v.mixer" in keys and "blocks.0.attn.qkv.lora_A" not in keys
    fresh = tiny_timm_vit()
    mms.load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), out, rtol=0, atol=0)
    # plain LoRA of rank 3r on the fused qkv (mixers folded, block-diagonal up): stock PEFT keys, same output
    mms.export_peft(model, tmp_path / "peft")
    other = tiny_timm_vit()
    mms.import_peft(other, tmp_path / "peft")
    assert dict(mms.iter_adapters(other))["blocks.0.attn.qkv"].rank == 12
    with torch.no_grad():
        torch.testing.assert_close(other(images), out, rtol=1e-4, atol=1e-5)


def test_fused_errors():
    vit = tiny_open_clip_vit()
    mms.inject(vit, _config("lora", targets="open_clip"))
    with pytest.raises(MergeError, match="nn.MultiheadAttention"):
        mms.lora_factors(vit)
    model = tiny_timm_vit()
    with pytest.raises(TargetError, match=r"has fused slices \['q', 'k', 'v'\], not \['o'\]"):
        mms.inject(model, _config("lora", targets=["blocks.0.attn.qkv"], fused_slices={"qkv": ["q", "o"]}))
    with pytest.raises(TargetError, match="do not split into equal q, k, v thirds"):
        mms.inject(model, _config("lora", targets=["head"], fused_slices={"head": ["q"]}))
    assert mms.list_adapters(model) == {}  # failed injections leave the model untouched
    with pytest.raises(ConfigError, match="distinct slices"):
        mms.LoraConfig(fused_slices={"qkv": ["q", "q"]})


def test_user_slices_override_preset_and_rows_route_per_adapter():
    torch.manual_seed(0)
    model = tiny_timm_vit()
    mms.inject(model, _config("lora", targets="timm_vit", fused_slices={"qkv": ["v"]}))
    assert list(model.blocks[1].attn.qkv.adapters["default"].parts) == ["v"]  # the user's entry wins
    vit = tiny_open_clip_vit()
    x = torch.randn(2, 5, 64)
    mha = vit.transformer.resblocks[0].attn
    with torch.no_grad():
        base = mha(x, x, x, need_weights=False)[0]
        mms.inject(vit, _config("moslora", targets="open_clip"))
        adapted = vit.transformer.resblocks[0].attn(x, x, x, need_weights=False)[0]
        with mms.forward_context(vit, adapter_rows=["default", None]):
            routed = vit.transformer.resblocks[0].attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(routed[0], adapted[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], base[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted[0], base[0])


# -- the NaN guard names MHA and fused qkv wrappers --------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.qkv = nn.Linear(16, 48)
        self.fc = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.qkv(self.attn(x, x, x, need_weights=False)[0]))


@pytest.mark.parametrize("where", ["attn", "qkv"])
def test_nan_guard_names_mha_and_fused_qkv_wrappers(where):
    """The first NaN module is the fused wrapper (MultiheadAttentionLayer / fused qkv), not the next leaf."""
    from mm_subspace.training_utils import locate_nonfinite

    torch.manual_seed(0)
    model = Block()
    mms.inject(model, mms.LoraConfig(rank=2, targets=["attn", "qkv"], fused_slices={"qkv": ["q", "v"]}, init_weights=False))
    with torch.no_grad():
        getattr(model, where).adapters["default"].parts["v"].lora_B[0, 0] = float("nan")
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    cls = "MultiheadAttentionLayer" if where == "attn" else "AdapterLayer"
    assert locate_nonfinite({"m": model}, lambda: model(x)) == f"m.{where} ({cls})"
