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
from conftest import adapted
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
    from conftest import _official_forward, write_official

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


# -- installed layout and the script commands ---------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
SCRIPT_FLAGS = {"dreambooth": "--instance_data_dir", "visual-instruction": "--tune_projector", "compare": "--adapters"}


def run_outside(cwd: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m mm_subspace.cli ARGS`` (or ``python -c CODE``) from ``cwd`` with no PYTHONPATH: the installed package only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "mm_subspace.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_folders_install_inside_the_mm_subspace_namespace(tmp_path):
    """pipelines/, training/, apps/ import as mm_subspace.pipelines/.training/.apps from this checkout's folders;
    nothing named pipelines, training or apps is importable at the top level outside the checkout."""
    code = (
        "import importlib, json\n"
        "out = {m: importlib.import_module(m).__file__ for m in ('mm_subspace', 'mm_subspace.pipelines', "
        "'mm_subspace.training.dreambooth_sdxl', 'mm_subspace.training.visual_instruction', 'mm_subspace.apps.compare')}\n"
        "for top in ('pipelines', 'training', 'apps'):\n"
        "    try:\n        importlib.import_module(top); out[top] = 'importable'\n"
        "    except ModuleNotFoundError:\n        out[top] = None\n"
        "print(json.dumps(out))\n"
    )
    proc = run_outside(tmp_path, code=code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert Path(found["mm_subspace"]).parent == REPO / "mm_subspace", (
        f"the installed mm_subspace is {found['mm_subspace']}, not this checkout: `pip install -e {REPO}`")
    assert Path(found["mm_subspace.pipelines"]) == REPO / "pipelines" / "__init__.py"
    assert Path(found["mm_subspace.training.dreambooth_sdxl"]) == REPO / "training" / "dreambooth_sdxl.py"
    assert Path(found["mm_subspace.training.visual_instruction"]) == REPO / "training" / "visual_instruction.py"
    assert Path(found["mm_subspace.apps.compare"]) == REPO / "apps" / "compare.py"
    assert (found["pipelines"], found["training"], found["apps"]) == (None, None, None)


def test_pyproject_lists_every_package_folder():
    """The explicit package list of pyproject.toml holds every package folder (a missing one is left out of wheels)."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {"mm_subspace": "mm_subspace", **tool["package-dir"]}
    on_disk = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            if "__pycache__" not in rel and "weights" not in rel:
                on_disk.add(".".join((package, *rel)))
    assert set(tool["packages"]) == on_disk
    assert not any(p.split(".")[0] != "mm_subspace" for p in tool["packages"])


@pytest.mark.parametrize("command", list(SCRIPT_FLAGS))
def test_script_command_shows_the_scripts_own_help_from_any_directory(command, tmp_path):
    proc = run_outside(tmp_path, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: mm-subspace {command} ") and SCRIPT_FLAGS[command] in proc.stdout
    bad = run_outside(tmp_path, command, "--no_such_flag")
    assert bad.returncode == 2 and f"mm-subspace {command}: error: unrecognized arguments: --no_such_flag" in bad.stderr
    listed = run_outside(tmp_path, "--help")
    assert listed.returncode == 0 and command in listed.stdout


def test_visual_instruction_command_refuses_the_sdxl_recipe_alias(tmp_path):
    proc = run_outside(tmp_path, "visual-instruction", "--recipe", "moslora_paper")
    assert proc.returncode == 1
    assert "moslora_paper is the SDXL recipe moslora_sdxl" in proc.stderr and "moslora_vi_llama3" in proc.stderr


def test_dreambooth_command_trains_from_any_directory_like_the_script(tmp_path):
    """`mm-subspace dreambooth ARGS` from a folder outside the checkout (relative paths) writes the same adapter
    as ``main(parse_args(ARGS))`` of training/dreambooth_sdxl.py in this process."""
    from safetensors.torch import load_file

    from mm_subspace.tiny_models import write_cat_photos
    from mm_subspace.training import dreambooth_sdxl

    write_cat_photos(tmp_path / "cat", n=2, size=40)
    argv = ["--resolution", "32", "--rank", "2", "--report_to", "none", "--max_train_steps", "2",
            "--num_validation_images", "0", "--instance_data_dir", "cat", "--adapter", "moslora"]
    proc = run_outside(tmp_path, "dreambooth", *argv, "--output_dir", "cli_out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    here = Path.cwd()
    try:
        os.chdir(tmp_path)
        dreambooth_sdxl.main(dreambooth_sdxl.parse_args([*argv, "--output_dir", "direct_out"]))
    finally:
        os.chdir(here)
    cli_weights = load_file(tmp_path / "cli_out" / "unet" / "adapter_model.safetensors")
    direct = load_file(tmp_path / "direct_out" / "unet" / "adapter_model.safetensors")
    assert cli_weights.keys() == direct.keys() and len(direct) > 0
    assert all(torch.equal(cli_weights[k], direct[k]) for k in direct)
    assert (tmp_path / "cli_out" / "README.md").is_file()


def test_merge_llava_writes_the_processor_stock_tools_load(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mm_subspace.data.llava import digit_image
    from mm_subspace.tiny_models import tiny_llava_path

    base = tiny_llava_path()
    model = LlavaForConditionalGeneration.from_pretrained(base)
    torch.manual_seed(0)
    mms.inject(model, mms.MoSLoRAConfig(rank=2, alpha=4, init_weights=False, targets=r".*language_model\..*\.q_proj"))
    mms.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")  # the stock call that failed without the processor
    reference = AutoProcessor.from_pretrained(base)
    assert type(processor) is type(reference) and processor.chat_template == reference.chat_template
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is the digit even?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    ours = processor(images=digit_image(4), text=text, return_tensors="pt", add_special_tokens=False)
    ref = reference(images=digit_image(4), text=text, return_tensors="pt", add_special_tokens=False)
    assert torch.equal(ours["input_ids"], ref["input_ids"]) and torch.equal(ours["pixel_values"], ref["pixel_values"])


def test_merged_sdxl_pipeline_loads_in_stock_diffusers_without_torch_dtype(tmp_path):
    """A pipeline whose text encoders are stored in fp16 (as stabilityai's SDXL): the merged folder declares float32
    in the transformers configs, so stock diffusers loads one dtype throughout."""
    from diffusers import StableDiffusionXLPipeline

    from mm_subspace.tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(pretrained=False)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "text_encoder" / "config.json").read_text())["dtype"] == "float16"
    unet = tiny_sdxl_pipeline(pretrained=False).unet
    torch.manual_seed(0)
    mms.inject(unet, mms.MoSLoRAConfig(rank=2, alpha=4, init_weights=False, targets=["attn1.to_q"]))
    mms.save_adapter(unet, tmp_path / "adapter" / "unet")
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    merged.set_progress_bar_config(disable=True)
    assert {m.dtype for m in (merged.unet, merged.vae, merged.text_encoder, merged.text_encoder_2)} == {torch.float32}
    image = merged("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3)


# -- the CLI's merge command on a broken base -------------------------------------------
def test_cli_merge_with_broken_base_prints_one_error_line(tmp_path, capsys):
    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    base = tmp_path / "base"
    base.mkdir()
    for name, text in [("config.json", "{not json"), ("config.json", '{"architectures": 5}'),
                       ("config.json", '{"_class_name": "UNet2DConditionModel", "in_channels": "many"}'),
                       ("model_index.json", "[1]"), ("model_index.json", '{"_class_name": "StableDiffusionXLPipeline", "unet": 7}')]:
        for old in base.iterdir():
            old.unlink()
        (base / name).write_text(text)
        assert main(["merge", "--base", str(base), "--adapter", str(folder), str(tmp_path / f"m{len(text)}")]) == 1
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (diffusers may log its own warning line before)
        assert last.startswith("mm-subspace merge: error:") and "Traceback" not in err, (name, text, err)
