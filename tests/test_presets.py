"""Presets on their tiny models: modules adapted, base frozen, step 0 = base, one step changes the output."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace import presets, tiny_models
from mm_subspace.errors import ConfigError, TargetError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl():
    """UNet and both text encoders of the tiny SDXL (loaded without the rest of the pipeline)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = tiny_models.tiny_sdxl_path(pretrained=False)
    return SimpleNamespace(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
    )


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    for key in ("logits", "last_hidden_state", "sample"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(type(out))


def check_preset(model: nn.Module, config, run: Callable[[nn.Module], object], expected: int) -> dict[str, int]:
    """Inject ``config``; check count, frozen base, step-0 output, and that one AdamW step moves the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        base = _first_tensor(run(model)).clone()
    mms.inject(model, config)
    names = [n for n, _ in mms.adapter_layers(model)]
    assert len(names) == expected, names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n or n.startswith("trainable") for n in trainable if "multi_modal_projector" not in n)
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(run(model)), base, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = _first_tensor(run(model))
    (out.float() - torch.randn_like(out.float())).square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = _first_tensor(run(model))
    assert (after - base).abs().max() > 1e-4
    return {n.split(".")[-1]: 0 for n in names}


def _unet_run(unet):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.randn(1, 4, 64, generator=gen)
    cond = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.randn(1, 6, generator=gen)}
    return lambda m: m(sample, torch.tensor([10]), encoder_hidden_states=text, added_cond_kwargs=cond)


@pytest.mark.parametrize("preset, expected", [("sdxl_unet", 48), ("sdxl_unet_wide", 76)])
def test_sdxl_unet_presets(sdxl, preset, expected):
    import copy

    unet = copy.deepcopy(sdxl.unet)
    check_preset(unet, mms.MoSLoRAConfig(rank=4, alpha=4, targets=preset), _unet_run(unet), expected)
    names = [n for n, _ in mms.adapter_layers(unet)]
    for suffix, count in [("to_q", 12), ("to_out.0", 12), ("proj_in", 6), ("proj_out", 6), ("ff.net.0.proj", 6), ("ff.net.2", 6),
                          ("time_embedding.linear_1", 1), ("add_embedding.linear_2", 1)]:
        if preset == "sdxl_unet_wide" or suffix.startswith("to_"):
            assert sum(n.endswith(suffix) for n in names) == count, suffix
    assert not any("time_emb_proj" in n for n in names)  # resnets' timestep projections are not in the preset


def test_sdxl_text_encoder_preset(sdxl):
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    for encoder in (sdxl.text_encoder, sdxl.text_encoder_2):
        check_preset(encoder, mms.LoraConfig(rank=4, targets="sdxl_text_encoders"), lambda m: m(ids), 8)
        mms.unload(encoder)


def test_clip_vit_preset_vision_side_only():
    pixels = torch.randn(2, 3, 32, 32)
    check_preset(tiny_models.tiny_clip_vision(), mms.MoSLoRAConfig(rank=4, targets="clip_vit"), lambda m: m(pixel_values=pixels), 12)
    clip = tiny_models.tiny_clip_model()
    check_preset(clip, mms.LoraConfig(rank=4, targets="clip_vit"), lambda m: m.get_image_features(pixel_values=pixels), 12)
    assert all(n.startswith("vision_model.") for n, _ in mms.adapter_layers(clip))


def test_open_clip_preset():
    images = torch.randn(2, 3, 32, 32)
    vit = tiny_models.tiny_open_clip_vit()
    check_preset(vit, mms.MoSLoRAConfig(rank=4, targets="open_clip"), lambda m: m(images), 6)
    assert type(vit.transformer.resblocks[0].attn).__name__ == "MultiheadAttentionLayer"


def test_timm_vit_preset():
    images = torch.randn(2, 3, 32, 32)
    vit = tiny_models.tiny_timm_vit()
    check_preset(vit, mms.MoSLoRAConfig(rank=4, targets="timm_vit"), lambda m: m(images), 8)
    assert list(vit.blocks[0].attn.qkv.adapters["default"].parts) == ["q", "k", "v"]
    assert not any(n == "head" for n, _ in mms.adapter_layers(vit))


@pytest.mark.parametrize("preset, expected", [("llama", 14), ("llama_moslora", 10)])
def test_llama_presets(preset, expected):
    model, _ = tiny_models.tiny_llama()
    ids = torch.tensor([[49406, 320, 1929, 539, 320]])
    check_preset(model, mms.MoSLoRAConfig(rank=4, targets=preset), lambda m: m(input_ids=ids), expected)


@pytest.fixture(scope="module")
def llava_inputs():
    ids = torch.tensor([[49406] + [tiny_models.IMAGE_TOKEN_ID] * 16 + [320, 1929, 539]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}


def test_llava_preset_separate_vision_rank_alpha(llava_inputs):
    # issue 12 item 7 (deliberate change): the vision tower's MLP fc1/fc2 are adapted too (2 layers × 6, was × 4),
    # as in the MoSLoRA paper's XTuner configs, and the projector is adapted only with projector="adapt"
    model, _ = tiny_models.tiny_llava(pretrained=False)
    config = presets.llava_config("moslora", llm_rank=8, llm_alpha=16, vision_rank=4, vision_alpha=2, projector="adapt")
    assert config.targets == "llava_projector"
    check_preset(model, config, lambda m: m(**llava_inputs), 14 + 12 + 2)
    adapters = dict(mms.iter_adapters(model))
    lm = adapters["model.language_model.layers.0.self_attn.q_proj"]
    vision = adapters["model.vision_tower.encoder.layers.1.self_attn.out_proj"]
    projector = adapters["model.multi_modal_projector.linear_2"]
    assert (lm.rank, lm.alpha, vision.rank, vision.alpha, projector.rank, projector.alpha) == (8, 16.0, 4, 2.0, 4, 2.0)
    assert adapters["model.vision_tower.encoder.layers.0.mlp.fc2"].rank == 4  # vision tower: every linear


def test_llava_config_paper_defaults():
    """MoSLoRA Table 8, LLaMA3+ViT: LLM r=64 α=128, vision r=64 α=16; the projector is not adapted (§4.2)."""
    config = presets.llava_config()
    lm, vit = "model.language_model.layers.3.mlp.down_proj", "model.vision_tower.encoder.layers.7.self_attn.k_proj"
    assert (config.rank_for(lm), config.alpha_for(lm), config.rank_for(vit), config.alpha_for(vit)) == (64, 128.0, 64, 16.0)
    assert config.method == "moslora" and config.targets == "llava"
    with pytest.raises(ConfigError, match="projector must be one of"):
        presets.llava_config(projector="lora")


def test_llava_projector_trained_fully_saved_and_loaded(llava_inputs, tmp_path):
    model, _ = tiny_models.tiny_llava(pretrained=False)
    config = presets.llava_config("lora", llm_rank=4, llm_alpha=8, vision_rank=4, vision_alpha=4, projector="train")
    check_preset(model, config, lambda m: m(**llava_inputs), 14 + 12)  # ViT fc1/fc2 included since issue 12 item 7
    projector = model.model.multi_modal_projector
    assert all(p.requires_grad for p in projector.parameters())
    assert mms.trainable_parameters(model)[0] == sum(p.numel() for p in projector.parameters()) + sum(
        p.numel() for _, a in mms.iter_adapters(model) for p in a.parameters())
    mms.save_adapter(model, tmp_path)
    with torch.no_grad():
        out = model(**llava_inputs).logits
    fresh, _ = tiny_models.tiny_llava(pretrained=False)
    assert not torch.equal(fresh.model.multi_modal_projector.linear_1.weight, projector.linear_1.weight)
    mms.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.model.multi_modal_projector.linear_1.weight, projector.linear_1.weight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**llava_inputs).logits, out, rtol=0, atol=0)
    # PEFT export: the projector goes as modules_to_save; stock PEFT and our import_peft reproduce the outputs
    from peft import PeftModel

    mms.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_models.tiny_llava(pretrained=False)[0], tmp_path / "peft")
    imported, _ = tiny_models.tiny_llava(pretrained=False)
    mms.import_peft(imported, tmp_path / "peft")
    assert mms.list_adapters(imported)["default"].trainable_modules == ["multi_modal_projector"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**llava_inputs).logits, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(imported(**llava_inputs).logits, out, rtol=1e-4, atol=1e-5)
    # a second adapter without trainable_modules: switching to it freezes the projector
    mms.inject(fresh, mms.LoraConfig(rank=2, targets="llama"), adapter_name="other")
    mms.set_adapter(fresh, "other")
    assert not any(p.requires_grad for p in fresh.model.multi_modal_projector.parameters())
    mms.set_adapter(fresh, "default")
    assert all(p.requires_grad for p in fresh.model.multi_modal_projector.parameters())


def test_wrong_family_lists_what_was_looked_for_and_what_the_model_has():
    model, _ = tiny_models.tiny_llama()
    with pytest.raises(TargetError) as err:
        mms.inject(model, mms.LoraConfig(targets="sdxl_unet"))
    message = str(err.value)
    assert "preset 'sdxl_unet' looked for modules ending in ['to_q', 'to_k', 'to_v', 'to_out.0']" in message
    assert "LlamaForCausalLM has none" in message and "q_proj" in message and "gate_proj" in message
    assert mms.list_adapters(model) == {}
    with pytest.raises(TargetError, match=r"preset 'timm_vit' looked for .*attn\.qkv.* under"):
        mms.inject(tiny_models.tiny_clip_vision(), mms.LoraConfig(targets="timm_vit"))
    with pytest.raises(TargetError, match="trainable_modules|matched no module"):
        mms.inject(model, mms.LoraConfig(targets="llama", trainable_modules=["multi_modal_projector"]))
    assert mms.list_adapters(model) == {}


def test_every_preset_is_documented():
    for name in mms.list_presets():
        preset = presets.get_preset(name)
        assert len(preset.doc) > 80, name
