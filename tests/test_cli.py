"""The ``mm-subspace`` command line: each subcommand as a subprocess on the tiny models, errors in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mm_subspace as mms
from mm_subspace.cli import main

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))


def _llama():
    from transformers import LlamaForCausalLM

    from mm_subspace.tiny_models import tiny_llama_path

    return LlamaForCausalLM.from_pretrained(tiny_llama_path()).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def run(*args: str) -> subprocess.CompletedProcess:
    """``python -m mm_subspace.cli ARGS`` in a fresh process (what the console script runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(mms.__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mm_subspace.cli", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A MoSLoRA adapter (random non-zero A, M, B) on the tiny LLaMA, saved; with its logits."""
    torch.manual_seed(0)
    model = _llama()
    mms.inject(model, mms.MoSLoRAConfig(rank=4, alpha=8, init_weights=False, targets=TARGETS))
    with torch.no_grad():
        for _, a in mms.iter_adapters(model):
            a.lora_B.mul_(0.3)
    folder = mms.save_adapter(model, tmp_path_factory.mktemp("cli") / "adapter")
    return folder, _logits(model), model


def test_inspect(adapter):
    folder, _, model = adapter
    proc = run("inspect", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    per_module = {name: 4 * a.in_features + 4 * 4 + a.out_features * 4 for name, a in mms.iter_adapters(model)}
    assert info["method"] == "moslora" and info["rank"] == 4 and info["alpha"] == 8.0
    assert info["targets"] == sorted(TARGETS) and info["modules"] == 2 * len(TARGETS)
    assert info["trainable_params"] == sum(per_module.values()) == mms.trainable_parameters(model)[0]
    assert info["base_fingerprint"] == mms.base_fingerprint(model)
    assert main(["inspect", str(folder)]) == 0  # the text form


def test_export(adapter, tmp_path):
    """Subprocess: a text-encoder adapter to kohya from the folder alone; in-process: LLaMA to PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from mm_subspace.formats import kohya_state_dict
    from mm_subspace.tiny_models import tiny_sdxl_path

    te = CLIPTextModel.from_pretrained(tiny_sdxl_path(pretrained=False) / "text_encoder")
    mms.inject(te, mms.MoSLoRAConfig(rank=4, alpha=8, init_weights=False, targets="sdxl_text_encoders"))
    mms.save_adapter(te, tmp_path / "te")
    proc = run("export", str(tmp_path / "te"), "--to", "kohya", str(tmp_path / "te.safetensors"))
    assert proc.returncode == 0, proc.stderr
    got, ref = load_file(str(tmp_path / "te.safetensors")), kohya_state_dict(text_encoder=te)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    folder, expected, _ = adapter
    assert main(["export", str(folder), "--to", "peft", str(tmp_path / "peft")]) == 0
    peft_model = PeftModel.from_pretrained(_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)


def test_import_moslora(tmp_path):
    from test_interop import _official_forward, write_official

    factors = write_official(tmp_path / "official", _llama(), TARGETS, fmt="bin")
    proc = run("import-moslora", str(tmp_path / "official"), str(tmp_path / "ours"))
    assert proc.returncode == 0, proc.stderr
    base = mms.read_adapter_config(tmp_path / "ours")["base_model"]
    assert base["name_or_path"] == "tiny" and base["fingerprint"] is None  # from the official config, not the stand-in
    model = _llama()
    mms.load_adapter(model, tmp_path / "ours")
    torch.testing.assert_close(_logits(model), _logits(_official_forward(_llama(), factors, 2.0)), rtol=1e-5, atol=1e-5)


def test_merge_transformers_model(adapter, tmp_path):
    from transformers import LlamaForCausalLM

    from mm_subspace.tiny_models import tiny_llama_path

    folder, expected, _ = adapter
    proc = run("merge", "--base", str(tiny_llama_path()), "--adapter", str(folder), str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or "adapters" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_merge_diffusers_unet_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    from mm_subspace.tiny_models import tiny_sdxl_path

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path(pretrained=False) / "unet")
    mms.inject(unet, mms.TSMixingConfig(rank=2, alpha=4, init_weights=False, targets=["attn1.to_q"]))
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(name)
    expected = layer.base_layer.weight.detach() + layer.adapters["default"].delta_weight().detach()
    mms.save_adapter(unet, tmp_path / "unet_adapter")
    assert main(["merge", "--base", str(tiny_sdxl_path(pretrained=False) / "unet"), "--adapter", str(tmp_path / "unet_adapter"),
                 str(tmp_path / "merged")]) == 0
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged.get_submodule(name).weight, expected)


def test_help_for_every_subcommand(capsys):
    for argv in ([], ["inspect"], ["export"], ["import-moslora"], ["merge"]):
        assert main([*argv, "--help"]) == 0
        assert "usage: mm-subspace" in capsys.readouterr().out


def test_bad_input_gives_clear_errors_and_nonzero_status(adapter, tmp_path, capsys):
    folder, _, _ = adapter
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    assert "is neither an adapter folder" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "onnx", str(tmp_path / "x")]) == 2  # usage error
    assert "invalid choice" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "kohya", str(tmp_path / "k.safetensors")]) == 1
    assert "component" in capsys.readouterr().err
    assert main(["import-moslora", str(folder), str(tmp_path / "o")]) == 1  # ours is not an official checkpoint
    assert "error:" in capsys.readouterr().err
    assert main(["merge", "--base", str(tmp_path), "--adapter", str(folder), str(tmp_path / "m")]) == 1
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text("{not json")
    assert main(["export", str(tmp_path), "--to", "peft", str(tmp_path / "p")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
