"""Adapted-module and trainable-parameter counts on real model configs, built on the meta device (no weights).

Expected numbers are derived by hand from the published shapes, independently of the injector.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace import tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = (4, 8, 16)


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _counts(model: nn.Module, config) -> tuple[int, int]:
    mms.inject(model, config)
    assert _all_meta(model), "injection on meta must not materialise any tensor"
    n_layers = len(list(mms.adapter_layers(model)))
    trainable = mms.trainable_parameters(model)[0]
    mms.remove_adapter(model, "default")
    return n_layers, trainable


@pytest.fixture(scope="module")
def llama3_8b():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_models.llama3_8b_config())
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    return model


def test_llama3_8b_moslora_table4(llama3_8b):
    """MoSLoRA Table 4: r=16 on q,k,v,up,down of LLaMA-3-8B — LoRA 28.3M, MoSLoRA 28.4M (+r²·160)."""
    lora = _counts(llama3_8b, mms.LoraConfig(rank=16, alpha=32, targets="llama_moslora"))
    moslora = _counts(llama3_8b, mms.MoSLoRAConfig(rank=16, alpha=32, targets="llama_moslora"))
    assert lora == (160, 28_311_552)
    assert moslora == (160, 28_311_552 + 40_960)


@pytest.mark.parametrize("rank", RANKS)
def test_llama3_8b_counts(llama3_8b, rank):
    d, kv, ff, layers = 4096, 1024, 14336, 32
    qkvud = (d + d) + 2 * (d + kv) + 2 * (d + ff)
    every = qkvud + (d + d) + (d + ff)  # + o_proj, gate_proj
    assert _counts(llama3_8b, mms.LoraConfig(rank=rank, targets="llama_moslora")) == (5 * layers, rank * layers * qkvud)
    assert _counts(llama3_8b, mms.MoSLoRAConfig(rank=rank, targets="llama")) == (
        7 * layers, rank * layers * every + rank * rank * 7 * layers)


@pytest.fixture(scope="module")
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(tiny_models.sdxl_base_unet_config())
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    return unet


@pytest.mark.parametrize("rank", RANKS)
def test_sdxl_base_unet_counts(sdxl_unet, rank):
    # SDXL-base: transformer depth 2 in the 640-wide down block (2 blocks) and up block (3),
    # depth 10 in the 1280-wide down block (2), mid block (1) and up block (3); cross-attention dim 2048.
    blocks = {640: 2 * 2 + 3 * 2, 1280: 2 * 10 + 10 + 3 * 10}
    transformers2d = {640: 2 + 3, 1280: 2 + 1 + 3}
    per_block = {d: 6 * (2 * d) + 2 * (2048 + d) for d in blocks}  # attn1 q,k,v,o + attn2 q,o: d->d; attn2 k,v: 2048->d
    attention = sum(blocks[d] * per_block[d] for d in blocks)
    assert sum(blocks.values()) == 70
    assert _counts(sdxl_unet, mms.LoraConfig(rank=rank, targets="sdxl_unet")) == (70 * 8, rank * attention)
    ff = sum(blocks[d] * ((d + 8 * d) + (4 * d + d)) for d in blocks)  # GEGLU d->2·4d, then 4d->d
    proj = sum(transformers2d[d] * 2 * (2 * d) for d in blocks)  # linear proj_in / proj_out
    embeddings = (320 + 1280) + (1280 + 1280) + (2816 + 1280) + (1280 + 1280)  # time_embedding, add_embedding
    wide_modules = 70 * 8 + 11 * 2 + 70 * 2 + 4
    assert _counts(sdxl_unet, mms.LoraConfig(rank=rank, targets="sdxl_unet_wide")) == (
        wide_modules, rank * (attention + ff + proj + embeddings))


@pytest.mark.parametrize("rank", RANKS)
def test_clip_vit_l14_counts(rank):
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(tiny_models.clip_vit_l14_config())
    assert sum(p.numel() for p in model.parameters()) == 303_179_776
    d, ff, layers = 1024, 4096, 24
    per_layer = 4 * (d + d) + (d + ff) + (ff + d)
    assert _counts(model, mms.LoraConfig(rank=rank, targets="clip_vit")) == (6 * layers, rank * layers * per_layer)
    assert _counts(model, mms.MoSLoRAConfig(rank=rank, targets="clip_vit")) == (
        6 * layers, rank * layers * per_layer + rank * rank * 6 * layers)


# -- trainable vs stored ----------------------------------------------------------------------------------------
IN, OUT, R = 16, 12, 4
#: method -> (extra config, frozen elements the adapter file holds besides the trainable ones), by hand
FROZEN = {
    "lora": ({}, 0),
    "moslora": ({}, 0),
    "asylora": ({}, R * IN),  # frozen A (r, in)
    "sulora": ({}, 2 * R * IN),  # paired: frozen A (N, in), N = 2r; bank and router train
    "sulora_index": ({"pairing": "index"}, R * IN),  # Eq. 4 literal: frozen A (r, in)
    "sam_parser": ({}, OUT * min(IN, OUT) + min(IN, OUT) + min(IN, OUT) * IN),  # frozen U, Σ, Vᵀ (buffers)
}


@pytest.mark.parametrize("case", sorted(FROZEN))
def test_stored_counts_what_the_adapter_file_holds(tmp_path, case):
    """``parameter_counts``: trainable = what trains, stored = every element of adapter_model.safetensors
    (read back from disk), stored − trainable = the method's frozen tensors (hand-derived above)."""
    from safetensors import safe_open

    method = case.split("_index")[0]
    extra, frozen = FROZEN[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT))
    mms.inject(model, mms.config_for(method, rank=R, targets=["0"], **extra))
    counts = mms.parameter_counts(model)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.total == sum(p.numel() for p in model.parameters())
    mms.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        on_disk = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert counts.stored == on_disk
    assert counts.stored - counts.trainable == frozen
    line = mms.print_trainable_parameters(model)
    assert f"trainable params: {counts.trainable:,d} || stored adapter params: {counts.stored:,d} || " in line


def test_stored_counts_one_adapter_or_all():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT))
    mms.inject(model, mms.config_for("asylora", rank=R, targets=["0"]))
    mms.inject(model, mms.config_for("lora", rank=2, targets=["0"]), "other")
    asy, lora = R * (IN + OUT), 2 * (IN + OUT)
    assert mms.parameter_counts(model, "default").stored == asy
    assert mms.parameter_counts(model, "other").stored == lora
    assert mms.parameter_counts(model).stored == asy + lora
    assert mms.parameter_counts(model).trainable == R * OUT  # only the active adapter trains: AsyLoRA's B
    assert mms.parameter_counts(nn.Linear(3, 2)).stored == 0  # no adapter: nothing stored
