"""Parity with PEFT, plain-LoRA export (PEFT and diffusers formats) and PEFT import."""

from __future__ import annotations

import pytest
import torch

import mm_subspace as mms
from mm_subspace.errors import AdapterFileError


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomise(model, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(model):
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.2)


def test_lora_matches_peft_lora_given_the_same_factors():
    from peft import LoraConfig, get_peft_model

    ours = _llama()
    mms.inject(ours, mms.LoraConfig(rank=4, alpha=12, targets=TARGETS))
    _randomise(ours)
    peft_model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS)).eval()
    with torch.no_grad():
        for name, adapter in mms.iter_adapters(ours):
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(adapter.lora_A)
            module.lora_B["default"].weight.copy_(adapter.lora_B)
    torch.testing.assert_close(_logits(ours), _logits(peft_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["moslora", "ts_mixing"])
def test_peft_export_folds_the_mixer_and_loads_in_peftmodel(tmp_path, method):
    from peft import PeftModel

    ours = _llama()
    mms.inject(ours, mms.config_for(method, rank=4, alpha=8, targets=TARGETS, rank_pattern={"down_proj": 2}))
    _randomise(ours)
    expected = _logits(ours)
    mms.export_peft(ours, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    # and back: a PEFT LoRA checkpoint imports as our lora with the same outputs
    back = _llama()
    mms.import_peft(back, tmp_path / "peft")
    assert mms.list_adapters(back)["default"].method == "lora"
    torch.testing.assert_close(_logits(back), expected, rtol=1e-5, atol=1e-5)


def test_import_peft_trained_with_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], use_rslora=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    expected = _logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "p")
    ours = _llama()
    mms.import_peft(ours, tmp_path / "p")
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterFileError, match="not an mm_subspace adapter.*import_peft"):
        mms.load_adapter(_llama(), tmp_path / "p")


def _sdxl_latents(pipe, size: int = 64, steps: int = 3) -> torch.Tensor:
    return pipe("a photo of sks cat", num_inference_steps=steps, height=size, width=size, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _tiny_sdxl():
    from mm_subspace.tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(pretrained=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_moslora_export_loads_in_stock_diffusers(tmp_path):
    """The official MoSLoRA code loses the mixer on the way to diffusers; our folded export keeps it."""
    latents = _sdxl_latents
    pipe = _tiny_sdxl()
    base = latents(pipe)
    mms.inject(pipe.unet, mms.MoSLoRAConfig(rank=4, alpha=8, mixer_init="orthogonal", targets="sdxl_unet"))
    mms.inject(pipe.text_encoder, mms.MoSLoRAConfig(rank=4, alpha=4, targets="sdxl_text_encoders"))
    _randomise(pipe.unet, 1)
    _randomise(pipe.text_encoder, 2)
    ours = latents(pipe)
    assert not torch.allclose(ours, base, atol=1e-3)
    mms.export_diffusers(tmp_path / "lora", unet=pipe.unet, text_encoder=pipe.text_encoder)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    stock = _tiny_sdxl()
    stock.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(latents(stock), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer_init", [None, "orthogonal"])
def test_sdxl_dora_export_loads_in_stock_diffusers(tmp_path, mixer_init):
    """DoRA (and DoRA + MoSLoRA mixer, folded into B) through ``pytorch_lora_weights.safetensors``:
    stock ``load_lora_weights`` reads the ``lora_magnitude_vector`` keys and builds PEFT DoRA layers whose
    output equals ours (DoRA Eq. 5, norm per output row)."""
    from safetensors.torch import load_file

    def latents(pipe) -> torch.Tensor:
        return _sdxl_latents(pipe, size=32, steps=2)

    pipe = _tiny_sdxl()
    base = latents(pipe)
    mms.inject(pipe.unet, mms.config_for("dora", rank=4, alpha=8, mixer_init=mixer_init, targets="sdxl_unet"))
    mms.inject(pipe.text_encoder_2, mms.config_for("dora", rank=2, targets="sdxl_text_encoders"))
    _randomise(pipe.unet, 1)
    _randomise(pipe.text_encoder_2, 2)
    ours = latents(pipe)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters: parity below is not vacuous
    mms.export_diffusers(tmp_path / "dora", unet=pipe.unet, text_encoder_2=pipe.text_encoder_2)
    keys = load_file(str(tmp_path / "dora" / "pytorch_lora_weights.safetensors"))
    mags = [k for k in keys if k.endswith(".lora_magnitude_vector.weight")]
    assert any(k.startswith("unet.") for k in mags) and any(k.startswith("text_encoder_2.") for k in mags)

    stock = _tiny_sdxl()
    stock.load_lora_weights(tmp_path / "dora")
    assert stock.unet.peft_config["default_0"].use_dora
    torch.testing.assert_close(latents(stock), ours, rtol=1e-4, atol=1e-4)
