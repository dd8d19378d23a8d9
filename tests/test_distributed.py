"""mm_subspace.distributed and the GPU path of both training scripts, simulated on CPU (docs/gpu.md):

* fp16 dynamic loss scaling: a ``GradScaler`` forced on CPU with init scale 2**24 overflows on the first
  steps, as a GPU run does while the scaler calibrates; the skipped steps are counted and logged, the run
  finishes with a trained, finite adapter; ``--max_skipped_steps`` in a row stop it.
* validation in chunks, the VAE decoding in fp32 outside autocast.
* FSDP2 (gloo, 2 processes): the adapter equals the DDP run's, checkpoints hold the adapter only, resume.
* refusals: DeepSpeed, FSDP1, FSDP2 with several models; a resume on another number of processes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from conftest import run_two_cpu_processes
from mm_subspace import distributed
from mm_subspace.errors import ConfigError, NonFiniteError
from mm_subspace.training import dreambooth_sdxl as db
from mm_subspace.training import visual_instruction as vi
from mm_subspace.training_utils import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
DB_SCRIPT = ROOT / "training" / "dreambooth_sdxl.py"
VI_SCRIPT = ROOT / "training" / "visual_instruction.py"
DB_FAST = ["--resolution", "32", "--rank", "2", "--report_to", "none", "--validation_inference_steps", "2",
           "--learning_rate", "1e-3", "--default_subject", "cat", "--num_validation_images", "0"]
VI_FAST = ["--report_to", "none", "--threads", "1", "--train_limit", "8", "--eval_limit", "4", "--train_batch_size", "4",
           "--rank", "4", "--eval_batch_size", "32", "--max_new_tokens", "3"]

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture
def forced_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TEST_GRADSCALER_ENV, str(2.0**24))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_trained_and_finite(folder: Path) -> None:
    tensors = adapter_tensors(folder)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    lora_b = [t for k, t in tensors.items() if k.endswith("lora_B")]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b), "B starts at zero: it must have moved"


# -- fp16 loss scaling -------------------------------------------------------------------------------
def test_dreambooth_fp16_scaler_skips_the_overflowing_first_steps_and_trains(tmp_path: Path, forced_scaler: None) -> None:
    out = tmp_path / "db"
    result = db.main(db.parse_args([*DB_FAST, "--output_dir", str(out), "--mixed_precision", "fp16",
                                    "--max_train_steps", "8", "--checkpointing_steps", "4"]))
    assert result["global_step"] == 8
    assert 1 <= result["skipped_steps"] < 8  # 2**24 overflows at first; the scale halves until steps succeed
    assert_trained_and_finite(out / "unet")
    for step in (4, 8):  # checkpoints written during and after the skipped steps hold finite adapters
        assert all(torch.isfinite(t).all() for t in adapter_tensors(out / f"checkpoint-{step}" / "unet").values())


def test_fp16_skipped_step_counts_survive_a_resume(tmp_path: Path, forced_scaler: None) -> None:
    """The skipped-step counts are saved in trainer_state.json with the checkpoint: resuming from step 4 ends with
    the same total as the uninterrupted run, not only the skips after the resume."""
    out = tmp_path / "db"
    flags = [*DB_FAST, "--output_dir", str(out), "--mixed_precision", "fp16", "--max_train_steps", "8",
             "--checkpointing_steps", "4"]
    whole = db.main(db.parse_args(flags))
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["skipped_steps"]
    assert saved["total"] >= 1  # the scale 2**24 overflows on the first steps
    AcceleratorState._reset_state(reset_partial_state=True)  # a second run in this process, as the fixture does
    resumed = db.main(db.parse_args([*flags, "--resume_from_checkpoint", "checkpoint-4"]))
    assert resumed["resumed_from"] == out / "checkpoint-4"
    assert resumed["skipped_steps"] == whole["skipped_steps"] >= saved["total"]


def test_visual_instruction_fp16_scaler_skips_the_overflowing_first_steps_and_trains(tmp_path: Path,
                                                                                    forced_scaler: None) -> None:
    out = tmp_path / "vi"
    result = vi.main(vi.parse_args([*VI_FAST, "--output_dir", str(out), "--adapter", "moslora", "--mixed_precision",
                                    "fp16", "--max_train_steps", "10", "--skip_eval", "--learning_rate", "1e-2"]))
    assert result["global_step"] == 10
    assert 1 <= result["skipped_steps"] < 10
    assert_trained_and_finite(out)


def test_consecutive_skipped_steps_stop_the_run_naming_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TEST_GRADSCALER_ENV, str(2.0**120))  # overflows for ~100 halvings
    with pytest.raises(NonFiniteError, match=r"skipped 3 steps in a row.*--max_skipped_steps"):
        db.main(db.parse_args([*DB_FAST, "--output_dir", str(tmp_path / "db"), "--mixed_precision", "fp16",
                               "--max_train_steps", "6", "--max_skipped_steps", "3"]))


# -- validation ------------------------------------------------------------------------------------
def test_validation_decodes_in_fp32_outside_autocast_in_chunks_with_the_images_of_one_call() -> None:
    from mm_subspace.tiny_models import tiny_sdxl_pipeline
    from mm_subspace.training.sdxl_diffusion import chunked_calls, validation_images

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = []
    decode = pipe.vae.decode

    def spy(latents: torch.Tensor, *a: object, **k: object) -> object:
        calls.append((latents.shape[0], latents.dtype, torch.is_autocast_enabled("cpu")))
        return decode(latents, *a, **k)

    pipe.vae.decode = spy
    sampler = {"height": 32, "width": 32, "num_inference_steps": 2}
    half = validation_images(pipe, chunked_calls("a photo", 5, 2, 7, **sampler), torch.bfloat16, progress=False)
    assert calls == [(2, torch.float32, False), (2, torch.float32, False), (1, torch.float32, False)]
    assert len(half) == 5 and half[0].size == (32, 32)
    chunked = validation_images(pipe, chunked_calls("a photo", 5, 2, 7, **sampler), torch.float32, progress=False)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(5)]
    one_call = pipe("a photo", num_images_per_prompt=5, generator=gens, **sampler).images
    for a, b in zip(chunked, one_call):  # the chunking does not change an image (seeded per image)
        diff = np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)
        assert np.abs(diff).max() <= 1


def test_validation_names_the_vae_flag_when_only_the_decode_is_nonfinite(caplog: pytest.LogCaptureFixture) -> None:
    from mm_subspace.tiny_models import tiny_sdxl_pipeline
    from mm_subspace.training.sdxl_diffusion import chunked_calls, validation_images

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.fill_(float("inf"))  # what an overflowing fp16 VAE does
    calls = chunked_calls("a photo", 2, 2, 0, height=32, width=32, num_inference_steps=2)
    images = validation_images(pipe, calls, torch.float32, progress=False)
    assert len(images) == 2
    assert "--pretrained_vae_model_name_or_path" in caplog.text and "latents are finite" in caplog.text


# -- refusals --------------------------------------------------------------------------------------
def _accelerator(kind: str, version: int = 2, processes: int = 2) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


@pytest.mark.parametrize(("kind", "version", "models", "quantized", "match"), [
    ("DEEPSPEED", 2, 1, False, "DeepSpeed is not supported.*FSDP2"),
    ("FSDP", 1, 1, False, "FSDP1 cannot.*fsdp_version: 2"),
    ("FSDP", 2, 3, False, "trains 3.*--train_text_encoder"),
    ("FSDP", 2, 1, True, "4-bit"),
])
def test_unsupported_distributed_setups_are_refused_naming_the_supported_ones(kind, version, models, quantized,
                                                                               match) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        distributed.check_setup(_accelerator(kind, version), models, quantized)
    assert "supported: one process, DDP" in str(err.value) and "fsdp2.yaml" in str(err.value)


def test_supported_setups_pass() -> None:
    assert distributed.check_setup(_accelerator("FSDP"), 1) == "fsdp2"
    assert distributed.check_setup(_accelerator("MULTI_GPU"), 3) == "ddp"
    assert distributed.check_setup(_accelerator("NO", processes=1), 3) == "single"


@pytest.mark.parametrize("config", sorted((ROOT / "training" / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_load_and_are_supported_setups(config: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(config))
    assert cfg.distributed_type.value in ("NO", "MULTI_GPU", "FSDP")
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and not cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"]
    assert cfg.mixed_precision in ("fp16", "bf16")
    assert f"training/accelerate_configs/{config.name}" in (ROOT / "docs" / "gpu.md").read_text()  # documented


def test_resume_on_another_number_of_processes_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "db"
    db.main(db.parse_args([*DB_FAST, "--output_dir", str(out), "--max_train_steps", "1"]))
    ckpt = out / "checkpoint-1"
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 1
    assert CheckpointManager(out, "moslora", num_processes=1).check_resumable(ckpt, ["unet"]) == 1
    with pytest.raises(ConfigError, match=r"written by a run on 1 processes, this one has 2.*--num_processes 1"):
        CheckpointManager(out, "moslora", num_processes=2).check_resumable(ckpt, ["unet"])


# -- FSDP2 on 2 CPU processes ----------------------------------------------------------------------
FSDP2 = {distributed.TEST_FSDP2_ENV: "1", "PYTHONPATH": str(ROOT)}


def _checkpoint_files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("script", ["dreambooth", "visual_instruction"])
def test_fsdp2_two_processes_train_the_adapter_of_ddp_checkpoint_it_alone_and_resume(tmp_path: Path, script: str) -> None:
    if script == "dreambooth":
        path, common = DB_SCRIPT, [*DB_FAST, "--adapter", "lora", "--max_train_steps", "2", "--checkpointing_steps", "1",
                                   "--with_prior_preservation", "--class_prompt", "a photo of a cat",
                                   "--num_class_images", "3", "--class_inference_steps", "2", "--sample_batch_size", "1"]
        part = ckpt_part = "unet"
    else:
        path, common = VI_SCRIPT, [*VI_FAST, "--adapter", "moslora", "--max_train_steps", "2", "--checkpointing_steps", "1",
                                   "--eval_limit", "2"]
        part, ckpt_part = "", "model"
    log, _ = run_two_cpu_processes(path, [*common, "--output_dir", str(tmp_path / "fsdp")], env=FSDP2, timeout=900)
    sharded, replicated = map(int, re.search(r"FSDP2: (\d+) frozen tensors sharded across 2 ranks, (\d+) trainable", log).groups())
    assert sharded > 0 and replicated > 0
    run_two_cpu_processes(path, [*common, "--output_dir", str(tmp_path / "ddp")], env={"PYTHONPATH": str(ROOT)},
                          timeout=900)
    _assert_same_adapter(tmp_path / "fsdp" / part, tmp_path / "ddp" / part)  # sharding the base changes nothing
    ckpt = tmp_path / "fsdp" / "checkpoint-1"
    files = _checkpoint_files(ckpt)
    assert not [f for f in files if "fsdp" in f or f.startswith("pytorch_model") or f.endswith(".distcp")], files
    weights = sum((ckpt / f).stat().st_size for f in files if f.endswith(".safetensors"))
    trainable = sum(t.numel() * 4 for t in adapter_tensors(ckpt / ckpt_part).values())
    assert weights < 3 * trainable + 4096  # the adapter (and its diffusers export), no frozen base
    if script == "dreambooth":  # class images generated across the ranks: the indices each seeded alike
        assert sorted(p.name for p in (tmp_path / "fsdp" / "class_images").iterdir()) == \
            ["class_00000.png", "class_00001.png", "class_00002.png"]
    else:
        assert json.loads((tmp_path / "fsdp" / "eval.json").read_text())  # evaluation ran on the sharded model
    # resume the sharded run from checkpoint-1: the same adapter as the uninterrupted one
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(ckpt, resumed / "checkpoint-1")
    if script == "dreambooth":
        os.symlink(tmp_path / "fsdp" / "class_images", resumed / "class_images")
    log, _ = run_two_cpu_processes(path, [*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest",
                                          "--checkpointing_steps", "5"], env=FSDP2, timeout=900)
    assert re.search(r"resuming from .*checkpoint-1", log)
    _assert_same_adapter(resumed / part, tmp_path / "fsdp" / part)
