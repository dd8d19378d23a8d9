"""Adapter file formats (mm_subspace.formats): PEFT, DoRA-in-PEFT, diffusers, kohya/A1111 and the official
MoSLoRA checkpoints; export parity with the stock loaders, import back, conversions without the base model,
and strict loading.

The official MoSLoRA layout (wutaiqiang/MoSLoRA, a patched PEFT 0.10), written by hand by
``conftest.write_official``:

    adapter_config.json        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_use_mixer": true,
                                "target_modules": [...], "lora_dropout": 0.0, ...}
    adapter_model.safetensors  (or adapter_model.bin, a torch.save'd dict of tensors)
        base_model.model.<module>.lora_A.weight    (r, in)    nn.Linear(in, r)
        base_model.model.<module>.lora_AB.weight   (r, r)     nn.Linear(r, r)   the mixer
        base_model.model.<module>.lora_B.weight    (out, r)   nn.Linear(r, out)

and its forward is ``base(x) + lora_B(lora_AB(lora_A(dropout(x)))) * lora_alpha / r``.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import mm_subspace as mms
from conftest import _official_forward, adapted, net, write_official
from mm_subspace.errors import AdapterFileError, ConfigError, SubspaceError
from mm_subspace.formats import (
    convert_adapter,
    convert_official_moslora,
    export_kohya,
    import_kohya,
    import_moslora,
    kohya_state_dict,
    sgm_unet_name,
)

pytestmark = pytest.mark.usefixtures("one_thread")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "time_emb_proj",
                "time_embedding.linear_1", "add_embedding.linear_2"]
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))  # input of conftest.net


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh():
    """The untouched tiny SDXL pipeline, loaded once; tests take deep copies (cheaper than reloading)."""
    return _tiny_sdxl()


def _latents(pipe) -> torch.Tensor:
    return _sdxl_latents(pipe, steps=2)


@pytest.fixture(scope="module")
def sdxl(fresh):
    """Tiny SDXL with MoSLoRA on the UNet (attention, ff, resnet time projections, embeddings),
    TS-Mixing on text_encoder and LoRA on text_encoder_2; random non-zero A, M, B."""
    torch.manual_seed(0)
    pipe = copy.deepcopy(fresh)
    mms.inject(pipe.unet, mms.MoSLoRAConfig(rank=4, alpha=8, init_weights=False, targets=UNET_TARGETS,
                                            rank_pattern={"ff.net.2": 2}))
    mms.inject(pipe.text_encoder, mms.TSMixingConfig(rank=4, alpha=6, init_weights=False, targets="sdxl_text_encoders"))
    mms.inject(pipe.text_encoder_2, mms.LoraConfig(rank=2, alpha=3, init_weights=False,
                                                   targets=["q_proj", "v_proj", "out_proj", "fc1"]))
    with torch.no_grad():  # B starts random too (init_weights=False); keep the update moderate
        for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for _, adapter in mms.iter_adapters(model):
                adapter.lora_B.mul_(0.3)
    ids = pipe.tokenizer("a photo of sks cat", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = pipe.text_encoder(ids).last_hidden_state
        with mms.disable_adapters(pipe.text_encoder):
            assert not torch.allclose(pipe.text_encoder(ids).last_hidden_state, adapted, atol=1e-3)
    return pipe, _latents(pipe)


def _llama():
    from transformers import LlamaForCausalLM

    from mm_subspace.tiny_models import tiny_llama_path

    return LlamaForCausalLM.from_pretrained(tiny_llama_path()).eval()


IDS = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _random_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


RANDOM_IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def _random_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=RANDOM_IDS).logits


def _randomise(model, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(model):
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.2)


def _sdxl_latents(pipe, size: int = 64, steps: int = 3) -> torch.Tensor:
    return pipe("a photo of sks cat", num_inference_steps=steps, height=size, width=size, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _tiny_sdxl():
    from mm_subspace.tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(pretrained=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- formats.peft: parity with PEFT, export with the mixer folded into B, import ---------------------------------
def test_lora_matches_peft_lora_given_the_same_factors():
    from peft import LoraConfig, get_peft_model

    ours = _random_llama()
    mms.inject(ours, mms.LoraConfig(rank=4, alpha=12, targets=LLAMA_TARGETS))
    _randomise(ours)
    peft_model = get_peft_model(_random_llama(), LoraConfig(r=4, lora_alpha=12, target_modules=LLAMA_TARGETS)).eval()
    with torch.no_grad():
        for name, adapter in mms.iter_adapters(ours):
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(adapter.lora_A)
            module.lora_B["default"].weight.copy_(adapter.lora_B)
    torch.testing.assert_close(_random_logits(ours), _random_logits(peft_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["moslora", "ts_mixing"])
def test_peft_export_folds_the_mixer_and_loads_in_peftmodel(tmp_path, method):
    from peft import PeftModel

    ours = _random_llama()
    mms.inject(ours, mms.config_for(method, rank=4, alpha=8, targets=LLAMA_TARGETS, rank_pattern={"down_proj": 2}))
    _randomise(ours)
    expected = _random_logits(ours)
    mms.export_peft(ours, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(_random_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(_random_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    # and back: a PEFT LoRA checkpoint imports as our lora with the same outputs
    back = _random_llama()
    mms.import_peft(back, tmp_path / "peft")
    assert mms.list_adapters(back)["default"].method == "lora"
    torch.testing.assert_close(_random_logits(back), expected, rtol=1e-5, atol=1e-5)


def test_import_peft_trained_with_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_random_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], use_rslora=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    expected = _random_logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "p")
    ours = _random_llama()
    mms.import_peft(ours, tmp_path / "p")
    torch.testing.assert_close(_random_logits(ours), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterFileError, match="not an mm_subspace adapter.*import_peft"):
        mms.load_adapter(_random_llama(), tmp_path / "p")


# -- formats.diffusers: SDXL exports load in stock diffusers -----------------------------------------------------
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


# -- formats.kohya -----------------------------------------------------------------------------------------------
def test_sgm_names_are_the_inverse_of_diffusers_block_mapping():
    # SDXL: layers_per_block 2 -> down block b, layer j is input_blocks[1 + 3b + j]; up: output_blocks[3b + j]
    assert sgm_unet_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_unet_name("down_blocks.2.attentions.1.proj_in") == "input_blocks.8.1.proj_in"
    assert sgm_unet_name("mid_block.attentions.0.transformer_blocks.3.ff.net.2") == "middle_block.1.transformer_blocks.3.ff.net.2"
    assert sgm_unet_name("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0") == \
        "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0"
    assert sgm_unet_name("up_blocks.1.resnets.2.time_emb_proj") == "output_blocks.5.0.emb_layers.1"
    assert sgm_unet_name("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1"
    with pytest.raises(ConfigError, match="export_diffusers"):
        sgm_unet_name("conv_in")
    with pytest.raises(ConfigError, match="layers_per_block"):
        sgm_unet_name("down_blocks.0.attentions.2.proj_in")


def test_kohya_keys_follow_diffusers_conversion_rules(sdxl):
    """diffusers' own kohya converter maps every key we write back to the module it came from."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    pipe, _ = sdxl
    state = kohya_state_dict(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in state)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state  # kohya keeps text_model
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in state
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(dict(state), pipe.unet.config))

    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for component, model in parts.items():  # then the same PEFT-key conversion load_lora_weights applies
        sub = {k.removeprefix(component + "."): v for k, v in converted.items() if k.startswith(component + ".")}
        if component == "unet":
            peft_keys = convert_unet_state_dict_to_peft(sub)
        else:
            peft_keys = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
            if not hasattr(model, "text_model"):
                peft_keys = {k.removeprefix("text_model."): v for k, v in peft_keys.items()}
        got = {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")}
        assert got == {name for name, _ in mms.iter_adapters(model)}, component
    assert len(alphas) == sum(len(list(mms.iter_adapters(m))) for m in parts.values())


def test_kohya_export_loads_in_stock_diffusers_and_imports_back(sdxl, fresh, tmp_path):
    pipe, ours = sdxl
    path = export_kohya(tmp_path / "lora.safetensors", pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
        alpha = fh.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha")
        up = fh.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight")
    adapter = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").adapters["default"]
    assert float(alpha) == 8.0  # the true alpha, not r
    torch.testing.assert_close(up, adapter.lora_B.detach() @ adapter.mixer.detach())  # mixer folded: up = B·M
    assert meta["ss_network_module"] == "networks.lora" and "moslora" in meta["mm_subspace_methods"]
    assert len(keys) == 3 * sum(len(list(mms.iter_adapters(m))) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2))

    stock = copy.deepcopy(fresh)
    stock.load_lora_weights(str(path))
    torch.testing.assert_close(_latents(stock), ours, rtol=1e-4, atol=1e-4)

    # and back into our own plain LoRA, per-module rank and alpha kept
    stock.unload_lora_weights()
    done = import_kohya(path, stock.unet, stock.text_encoder, stock.text_encoder_2)
    assert set(done) == {"unet", "text_encoder", "text_encoder_2"}
    assert mms.list_adapters(stock.unet)["default"].method == "lora"
    torch.testing.assert_close(_latents(stock), ours, rtol=1e-4, atol=1e-4)


def test_kohya_import_is_strict_about_unknown_keys(sdxl, fresh, tmp_path, caplog):
    from safetensors.torch import save_file

    pipe, _ = sdxl
    state = kohya_state_dict(text_encoder=pipe.text_encoder)
    dora = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"
    save_file({**state, dora: torch.ones(1, 32)}, str(tmp_path / "d.safetensors"))
    te = copy.deepcopy(fresh.text_encoder)
    with pytest.raises(AdapterFileError, match="dora_scale") as err:
        import_kohya(tmp_path / "d.safetensors", text_encoder=te)
    assert "strict=False" in str(err.value)
    assert mms.list_adapters(te) == {}  # nothing injected on failure
    with caplog.at_level(logging.WARNING, logger="mm_subspace"):
        import_kohya(tmp_path / "d.safetensors", text_encoder=te, strict=False)
    assert dora in caplog.text
    # shape mismatch: up of the wrong rank
    bad = dict(state)
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    bad[key] = torch.zeros(32, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterFileError, match="not a valid LoRA pair"):
        import_kohya(tmp_path / "bad.safetensors", text_encoder=copy.deepcopy(fresh.text_encoder))


# -- formats.official_moslora ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_official_moslora_import_reproduces_its_outputs(tmp_path, fmt):
    model = _llama()
    factors = write_official(tmp_path / "official", model, LLAMA_TARGETS, fmt=fmt)
    expected = _logits(_official_forward(_llama(), factors, 8.0 / 4))
    import_moslora(model, tmp_path / "official")
    assert mms.list_adapters(model)["default"].method == "moslora"
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    adapter = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    torch.testing.assert_close(adapter.mixer.detach(), factors["model.layers.0.self_attn.q_proj"][1])

    # one step to PEFT (mixer folded into B): stock PeftModel reproduces it too
    from peft import PeftModel

    convert_official_moslora(tmp_path / "official", tmp_path / "peft", to="peft", component=None)
    peft_model = PeftModel.from_pretrained(_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)


def test_official_checkpoint_strictness(tmp_path, caplog):
    model = _llama()
    write_official(tmp_path / "o", model, ["q_proj"])
    # a plain-LoRA loader refuses lora_AB, naming it; non-strict loads A, B and logs every skipped key
    with pytest.raises(AdapterFileError, match="lora_AB"):
        mms.import_peft(_llama(), tmp_path / "o")
    with caplog.at_level(logging.WARNING, logger="mm_subspace"):
        mms.import_peft(_llama(), tmp_path / "o", strict=False)
    assert "model.layers.0.self_attn.q_proj.lora_AB.weight" in caplog.text
    assert "model.layers.1.self_attn.q_proj.lora_AB.weight" in caplog.text

    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    missing = {k: v for k, v in state.items() if k != "base_model.model.model.layers.1.self_attn.q_proj.lora_AB.weight"}
    save_file(missing, str(tmp_path / "o" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"missing keys \['model.layers.1.self_attn.q_proj.mixer'\]"):
        import_moslora(model, tmp_path / "o")
    assert mms.list_adapters(model) == {}  # rolled back
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm_subspace"):
        import_moslora(model, tmp_path / "o", strict=False)
    assert "model.layers.1.self_attn.q_proj.mixer" in caplog.text

    wrong = dict(state)
    wrong["base_model.model.model.layers.0.self_attn.q_proj.lora_AB.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(tmp_path / "o" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"q_proj.mixer: file \(3, 3\) vs model \(4, 4\)"):
        import_moslora(_llama(), tmp_path / "o")
    save_file({**state, "base_model.model.x.dora_scale": torch.ones(3)}, str(tmp_path / "o" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="dora_scale"):
        import_moslora(_llama(), tmp_path / "o")


def test_official_sdxl_checkpoint_converts_in_one_step_to_diffusers_and_kohya(sdxl, tmp_path):
    """Written from our UNet's MoSLoRA tensors, converted without a model: same files as our own export."""
    from safetensors.torch import load_file, save_file

    pipe, _ = sdxl
    folder = tmp_path / "official"
    folder.mkdir()
    state = {}
    for name, adapter in mms.iter_adapters(pipe.unet):
        for ours, theirs in (("lora_A", "lora_A"), ("mixer", "lora_AB"), ("lora_B", "lora_B")):
            state[f"base_model.model.{name}.{theirs}.weight"] = getattr(adapter, ours).detach().clone()
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_use_mixer": True, "rank_pattern": {"ff.net.2": 2},
         "target_modules": UNET_TARGETS}))
    convert_official_moslora(folder, tmp_path / "diffusers", to="diffusers", component="unet")
    mms.export_diffusers(tmp_path / "ref", unet=pipe.unet)
    got, ref = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("diffusers", "ref"))
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])
    path = convert_official_moslora(folder, tmp_path / "k.safetensors", to="kohya", component="unet")
    ref = kohya_state_dict(unet=pipe.unet)
    got = load_file(str(path))
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])


def test_official_sdxl_diffusers_layout_imports_and_converts(sdxl, fresh, tmp_path):
    """The official SDXL script saves ``pytorch_lora_weights.safetensors`` via convert_state_dict_to_diffusers,
    which renames lora_A/lora_AB/lora_B to ``lora.down``/``lora.downB``/``lora.up`` (UNet) and
    ``lora_linear_layer.down``/``downB``/``up`` (text encoders), ``unet.``/``text_encoder.`` prefixed, alpha = r.
    Written here from our UNet MoSLoRA and text-encoder TS-Mixing (its butterfly is a mixer too), scale folded into up."""
    from safetensors.torch import load_file, save_file

    pipe, _ = sdxl
    state = {}
    for component, spell in (("unet", "lora"), ("text_encoder", "lora_linear_layer")):
        for name, adapter in mms.iter_adapters(getattr(pipe, component)):
            prefix = f"{component}.{'text_model.' if component == 'text_encoder' else ''}{name}.{spell}"
            state[f"{prefix}.down.weight"] = adapter.lora_A.detach().clone()
            state[f"{prefix}.downB.weight"] = adapter.mixer.detach().clone()
            state[f"{prefix}.up.weight"] = adapter.lora_B.detach() * adapter.scaling
    (tmp_path / "official").mkdir()
    save_file(state, str(tmp_path / "official" / "pytorch_lora_weights.safetensors"))

    convert_official_moslora(tmp_path / "official", tmp_path / "diffusers", to="diffusers")
    mms.export_diffusers(tmp_path / "ref", unet=pipe.unet, text_encoder=pipe.text_encoder)
    got, ref = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("diffusers", "ref"))
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)

    # via our format: a pipeline adapter folder whose components are known again from the recorded class
    convert_official_moslora(tmp_path / "official", tmp_path / "ours", to="mm_subspace")
    assert mms.read_adapter_config(tmp_path / "ours" / "unet")["base_model"]["class"] == "UNet2DConditionModel"
    convert_adapter(tmp_path / "ours", tmp_path / "again", "diffusers")
    again = load_file(str(tmp_path / "again" / "pytorch_lora_weights.safetensors"))
    assert again.keys() == ref.keys() and all(torch.equal(again[k], got[k]) for k in ref)

    te = copy.deepcopy(fresh.text_encoder)
    with pytest.raises(ConfigError, match="component"):
        import_moslora(te, tmp_path / "official")
    import_moslora(te, tmp_path / "official", component="text_encoder")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(te(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_import_moslora_on_our_folder_and_inject_into_peft_model_say_what_to_do(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    with pytest.raises(AdapterFileError, match=r"is an mm_subspace adapter folder.*mm_subspace\.load_adapter"):
        mms.import_moslora(net(), folder)
    peft_model = get_peft_model(net(), PeftLoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"wrapped by PEFT.*unload\(\).*import_peft") as info:
        mms.inject(peft_model, mms.LoraConfig(rank=2, targets=["0"]))
    assert "base_layer" not in str(info.value)
    with pytest.raises(ConfigError, match="wrapped by PEFT"):
        mms.inject(peft_model.base_model.model, mms.LoraConfig(rank=2, targets=["0"]))


# -- formats.dora_peft -------------------------------------------------------------------------------------------
def test_dora_exports_to_peft_layout_and_refuses_other_axes(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from mm_subspace.formats import export_dora_peft, import_dora_peft

    torch.manual_seed(0)
    model = _llama()
    mms.inject(model, mms.config_for("dora", rank=4, alpha=8, init_weights=False, targets=LLAMA_TARGETS,
                                      mixer_init="orthogonal"))
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(model):
            adapter.lora_B.mul_(0.3)
            adapter.magnitude.mul_(1 + 0.2 * torch.randn_like(adapter.magnitude))
    expected = _logits(model)
    export_dora_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert config["use_dora"] is True
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    magnitude = state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert magnitude.shape == (q.out_features,)  # one value per output row (DoRA Eq. 5, PEFT's axis)
    torch.testing.assert_close(magnitude, q.adapters["default"].magnitude.detach())

    peft_model = PeftModel.from_pretrained(_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-4, atol=1e-4)
    back = _llama()
    import_dora_peft(back, tmp_path / "peft")
    assert mms.list_adapters(back)["default"].method == "dora"
    torch.testing.assert_close(_logits(back), expected, rtol=1e-4, atol=1e-4)

    # from the saved folder alone, "peft" picks the DoRA layout; kohya refuses with the reason;
    # diffusers writes PEFT's magnitude keys (tested against the stock loader above)
    mms.save_adapter(model, tmp_path / "ours")
    convert_adapter(tmp_path / "ours", tmp_path / "peft2", "peft")
    state2 = load_file(str(tmp_path / "peft2" / "adapter_model.safetensors"))
    assert state2.keys() == state.keys()
    with pytest.raises(ConfigError, match="dora_scale"):
        convert_adapter(tmp_path / "ours", tmp_path / "kohya", "kohya", component="text_encoder")
    with pytest.raises(ConfigError, match="export_dora_peft"):
        kohya_state_dict(text_encoder=model)


@pytest.mark.parametrize("method", mms.list_methods())
def test_has_magnitude_is_true_exactly_for_methods_that_keep_one(method):
    """``config_class.has_magnitude`` (what scripts ask instead of comparing method names) matches the
    adapters: a DoRA-style per-row magnitude, which only the PEFT use_dora layout can hold."""
    from mm_subspace.formats import dora_magnitudes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    mms.inject(model, mms.config_for(method, targets=["0"]))
    cls = mms.get_method(method).config_class
    assert cls.has_magnitude == bool(dora_magnitudes(model)), method


# -- conversion from the saved folder alone ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "moslora", "ts_mixing"])
def test_llama_round_trips_through_every_format(tmp_path, method):
    from peft import PeftModel

    model = _llama()
    mms.inject(model, mms.config_for(method, rank=4, alpha=8, init_weights=False, targets=LLAMA_TARGETS,
                                      rank_pattern={"down_proj": 2}))
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(model):
            adapter.lora_B.mul_(0.3)
    expected = _logits(model)
    mms.save_adapter(model, tmp_path / "ours")
    convert_adapter(tmp_path / "ours", tmp_path / "copy", "mm_subspace")
    convert_adapter(tmp_path / "ours", tmp_path / "peft", "peft")

    assert mms.read_adapter_config(tmp_path / "copy")["base_model"] == mms.read_adapter_config(tmp_path / "ours")["base_model"]
    reloaded = _llama()
    mms.load_adapter(reloaded, tmp_path / "copy")
    assert torch.equal(_logits(reloaded), expected)  # the stand-in re-save is bit-exact
    peft_model = PeftModel.from_pretrained(_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    imported = _llama()
    mms.import_peft(imported, tmp_path / "peft")
    torch.testing.assert_close(_logits(imported), expected, rtol=1e-5, atol=1e-5)
    for fmt in ("diffusers", "kohya"):  # --component cannot make a LLaMA adapter an SDXL one: point to peft
        with pytest.raises(ConfigError, match=rf"{fmt} has no format for a LlamaForCausalLM adapter.*--to peft"):
            convert_adapter(tmp_path / "ours", tmp_path / fmt, fmt)


def test_sdxl_standin_conversion_equals_export_from_the_live_pipeline(sdxl, tmp_path):
    from safetensors.torch import load_file

    pipe, _ = sdxl
    for component in ("unet", "text_encoder", "text_encoder_2"):
        mms.save_adapter(getattr(pipe, component), tmp_path / "pipe" / component)
    path = convert_adapter(tmp_path / "pipe", tmp_path / "k.safetensors", "kohya")
    ref = kohya_state_dict(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    got = load_file(str(path))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    convert_adapter(tmp_path / "pipe", tmp_path / "d", "diffusers")
    mms.export_diffusers(tmp_path / "ref", pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    got, ref = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("d", "ref"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # a single component folder knows its component from the recorded base class
    one = convert_adapter(tmp_path / "pipe" / "text_encoder_2", tmp_path / "te2.safetensors", "kohya")
    assert all(k.startswith("lora_te2_") for k in load_file(str(one)))


def test_export_refuses_to_overwrite_its_source(tmp_path, capsys):
    from mm_subspace.cli import main

    folder = tmp_path / "a"
    source = adapted()
    mms.save_adapter(source, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, folder / "peft", tmp_path):
        assert main(["export", str(folder), "--to", "peft", str(out)]) == 1
        assert "would overwrite or shadow" in capsys.readouterr().err
        assert main(["export", str(folder), "--to", "peft", str(out), "--force"]) == 1  # --force never allows it
        capsys.readouterr()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    fresh = net()
    mms.load_adapter(fresh, folder)
    assert torch.equal(fresh(X), source(X))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    assert main(["export", str(folder), "--to", "peft", str(elsewhere)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "peft", str(elsewhere), "--force"]) == 0
    with pytest.raises(ConfigError, match="would overwrite or shadow"):
        mms.convert_adapter(folder, folder, "peft")


# -- importers raise only SubspaceErrors -------------------------------------------------------------------------
def test_directories_and_malformed_tensors_raise_only_subspace_errors(tmp_path):
    peft = tmp_path / "peft"
    (peft / "adapter_config.json").mkdir(parents=True)  # a directory where a file belongs
    with pytest.raises(AdapterFileError, match="cannot be read"):
        mms.import_peft(net(), peft)
    with pytest.raises(AdapterFileError):
        mms.import_moslora(net(), peft)
    save_file({"lora_te1_0.lora_down.weight": torch.randn(2, 12), "lora_te1_0.lora_up.weight": torch.randn(16)},
              str(tmp_path / "k.safetensors"))  # a 1-D up matrix
    model = net()
    with pytest.raises(SubspaceError):
        mms.import_kohya(tmp_path / "k.safetensors", text_encoder=model)
    assert not mms.list_adapters(model)


def test_llava_adapter_to_diffusers_says_there_is_no_llava_format_and_points_to_peft(tmp_path):
    from mm_subspace.tiny_models import tiny_llava

    model, _ = tiny_llava()
    mms.inject(model, mms.config_for("moslora", rank=2, targets="llava"))
    mms.save_adapter(model, tmp_path / "llava")
    for fmt in ("diffusers", "kohya"):
        with pytest.raises(ConfigError, match=rf"{fmt} has no format for a LlavaForConditionalGeneration adapter.*"
                                              r"no --component can help.*--to peft") as err:
            convert_adapter(tmp_path / "llava", tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists(), err.value
    assert convert_adapter(tmp_path / "llava", tmp_path / "peft", "peft").is_dir()  # where the message points works


def test_adapter_of_unrecorded_base_to_diffusers_asks_for_the_component(tmp_path):
    model = _llama()
    mms.inject(model, mms.config_for("lora", rank=2, targets=LLAMA_TARGETS))
    folder = mms.save_adapter(model, tmp_path / "ours")
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["base_model"].pop("class")
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="say which component"):
        convert_adapter(folder, tmp_path / "d", "diffusers")
