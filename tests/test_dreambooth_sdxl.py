"""training/dreambooth_sdxl.py on the embedded tiny SDXL: outputs, stock-diffusers parity, resume after
SIGKILL, prior preservation, 2-process CPU run, bad input.

Runs are tiny (32 px, rank 2, 2-4 steps) and shared through module-scoped fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mm_subspace as mms
from mm_subspace import tiny_models
from mm_subspace.errors import ConfigError, NonFiniteError, TargetError
from mm_subspace.training_utils import CheckpointManager, sample_indices

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "dreambooth_sdxl.py"
_spec = importlib.util.spec_from_file_location("dreambooth_sdxl", SCRIPT)
db = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(db)

RES = "32"  # the embedded model's native size: latents 8x8
FAST = ["--resolution", RES, "--rank", "2", "--report_to", "none", "--validation_inference_steps", "2",
        "--learning_rate", "1e-3"]
PROMPT = "a photo of sks cat"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cat")
    tiny_models.write_cat_photos(folder, n=3, size=40)
    return folder


def run(out: Path, *extra: str, instance: Path | None = None) -> dict:
    argv = [*FAST, "--output_dir", str(out), *extra]
    if instance is not None:
        argv += ["--instance_data_dir", str(instance)]
    return db.main(db.parse_args(argv))


# -- every method: outputs, export, stock-loader parity ---------------------------------------------
METHODS = ["lora", "moslora", "sulora"]


class Runs(dict):
    """method -> result of a 3-step run, trained on first use (so `-k sulora` trains only sulora)."""

    def __init__(self, root: Path, instance: Path) -> None:
        super().__init__()
        self.root, self.instance = root, instance

    def __missing__(self, method: str) -> dict:
        if method not in mms.list_methods():
            pytest.skip(f"method {method!r} is not registered (mm_subspace.list_methods() = {mms.list_methods()})")
        extra = ["--train_text_encoder"] if method == "moslora" else []
        self[method] = run(self.root / method, "--adapter", method, "--max_train_steps", "3",
                           "--checkpointing_steps", "2", "--num_validation_images", "2", *extra, instance=self.instance)
        return self[method]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, instance_dir: Path) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), instance_dir)


def _images(pipe, seed: int = 7) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("method", METHODS)
def test_writes_every_output(trained: Runs, method: str) -> None:
    result = trained[method]
    out = Path(result["output_dir"])
    assert result["global_step"] == 3 and np.isfinite(result["final_loss"])
    # SuLoRA's load-balance loss (Eq. 6) reaches the objective and the log; LoRA/MoSLoRA have none
    assert (result["final_aux_loss"] != 0) == (method == "sulora")
    parts = ["unet", "text_encoder", "text_encoder_2"] if method == "moslora" else ["unet"]
    for part in parts:
        meta = json.loads((out / part / "adapter_config.json").read_text())
        assert meta["config"]["method"] == method and (out / part / "adapter_model.safetensors").is_file()
    assert not (out / "text_encoder").exists() or method == "moslora"
    assert (out / "training_state" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not [p for p in (out / "training_state").iterdir() if p.name.startswith(".")]  # no tmp leftovers
    for png in (out / "loss_curve.png", out / "validation" / "step-000003.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(out / "validation" / "step-000003.png").size == (64, 32)  # 2 images side by side
    card = (out / "README.md").read_text()
    assert f"**{method}**" in card and "final loss" in card and "validation/step-0-vs-3.png" in card  # step 0 above step 3
    assert Image.open(out / "validation" / "step-0-vs-3.png").size == (64, 64)
    assert "--adapter" in card and "loss_curve.png" in card
    exportable = mms.get_method(method).mergeable
    assert (out / "pytorch_lora_weights.safetensors").is_file() == exportable == result["exported"]
    if not exportable:
        assert "not exported to diffusers LoRA" in card


@pytest.mark.parametrize("method", ["lora", "moslora"])
def test_export_loads_in_stock_diffusers_and_matches(trained: Runs, method: str) -> None:
    """pytorch_lora_weights.safetensors + stock load_lora_weights == our unmerged adapters, same seed."""
    out = Path(trained[method]["output_dir"])
    base = tiny_models.tiny_sdxl_pipeline()
    base.set_progress_bar_config(disable=True)
    reference = _images(base)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if (out / part).is_dir():
            mms.load_adapter(getattr(base, part), out / part)
    ours = _images(base)
    stock = tiny_models.tiny_sdxl_pipeline()
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(out))
    theirs = _images(stock)
    gap = np.abs(ours - theirs).max()
    effect = np.abs(ours - reference).max()
    assert gap < 1e-5, gap
    assert effect > 100 * max(gap, 1e-7), (effect, gap)  # the adapter changes the image; parity is not vacuous
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder_2.") for k in keys) == (method == "moslora")


# -- resume after SIGKILL ----------------------------------------------------------------------------
RESUME = [*FAST, "--adapter", "moslora", "--num_validation_images", "0", "--checkpointing_steps", "1",
          "--lr_scheduler", "constant", "--gradient_accumulation_steps", "2"]


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, instance_dir: Path) -> None:
    """Kill a run (SIGKILL) after checkpoint-1, resume with `latest`: same weights as 2 uninterrupted steps.

    The killed run is given a huge --max_train_steps (constant lr, so the schedule does not depend on
    it) so it is still training when killed; checkpoints it wrote after checkpoint-1 are removed, so
    the resume covers step 2 (two accumulated micro-batches).
    """
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), *RESUME, "--instance_data_dir", str(instance_dir), "--output_dir", str(killed),
           "--max_train_steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = killed / "training_state" / "checkpoint-1"
    deadline = time.time() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.is_dir(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for path in (killed / "training_state").iterdir():
        if path.name != "checkpoint-1":
            shutil.rmtree(path)
    assert not (killed / "unet").exists()  # never finished

    resumed = db.main(db.parse_args([*RESUME, "--instance_data_dir", str(instance_dir), "--output_dir", str(killed),
                                     "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]))
    assert resumed["resumed_from"] == ckpt and resumed["global_step"] == 2
    straight = db.main(db.parse_args([*RESUME, "--instance_data_dir", str(instance_dir),
                                      "--output_dir", str(tmp_path / "straight"), "--max_train_steps", "2"]))
    a = load_file(killed / "unet" / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "unet" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["digest"] == straight["digest"]
    assert resumed["final_loss"] == straight["final_loss"]  # loss history restored with the checkpoint too


# -- prior preservation ------------------------------------------------------------------------------
def test_prior_preservation_generates_class_images(tmp_path: Path, instance_dir: Path) -> None:
    """Also the real-model path: a pipeline folder (save_pretrained layout) and a separate VAE folder."""
    out = tmp_path / "prior"
    model = tiny_models.tiny_sdxl_path()
    result = run(out, "--adapter", "lora", "--with_prior_preservation", "--class_prompt", "a photo of a cat",
                 "--num_class_images", "2", "--class_inference_steps", "2", "--max_train_steps", "1",
                 "--num_validation_images", "0", "--cache_latents", "--pretrained_model_name_or_path", str(model),
                 "--pretrained_vae_model_name_or_path", str(model / "vae"), instance=instance_dir)
    images = sorted((out / "class_images").glob("*.png"))
    assert len(images) == 2 and np.isfinite(result["final_loss"])
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["base_model"]["name_or_path"] == str(model)
    from PIL import Image

    assert Image.open(images[0]).size == (32, 32)


# -- two CPU processes -----------------------------------------------------------------------------
def test_two_process_cpu_run_ends_with_identical_adapters(tmp_path: Path, instance_dir: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *FAST,
           "--adapter", "moslora", "--train_text_encoder", "--max_train_steps", "2", "--num_validation_images", "0",
           "--checkpointing_steps", "1", "--instance_data_dir", str(instance_dir), "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    digests = dict(re.findall(r"rank (\d) adapter digest ([0-9a-f]{16})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert "adapters identical on all 2 ranks" in log
    assert "Num processes: 2" in log
    # rank 0's saved adapter is the one both ranks hold
    model = tiny_models.tiny_sdxl_pipeline()
    parts = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        mms.load_adapter(getattr(model, part), out / part)
        parts[part] = getattr(model, part)
    from mm_subspace.training_utils import adapters_digest

    assert adapters_digest(parts) == digests["0"]
    assert sorted(p.name for p in (out / "training_state").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "training_state" / "checkpoint-2" / "random_states_1.pkl").is_file()  # both ranks' RNG


def test_sample_indices_shard_each_epoch_once() -> None:
    seen = [i for step in range(3) for rank in range(2) for i in sample_indices(6, 1, step, rank, 2, seed=0)]
    assert sorted(seen) == list(range(6))


# -- bad input ---------------------------------------------------------------------------------------
def test_parse_args_errors_and_recipe() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'moslora'"):
        db.parse_args(["--adapter", "moslor"])
    with pytest.raises(ConfigError, match="--mixer_init does not apply to --adapter lora"):
        db.parse_args(["--adapter", "lora", "--mixer_init", "orthogonal"])
    with pytest.raises(ValueError, match="needs --class_prompt"):
        db.parse_args(["--with_prior_preservation", "--default_subject", "cat"])
    with pytest.raises(ValueError, match="--rank must be > 0"):
        db.parse_args(["--rank", "0"])
    paper = db.parse_args(["--recipe", "moslora_paper"])
    assert (paper.learning_rate, paper.max_train_steps, paper.mixer_init) == (1e-4, 500, "orthogonal")
    assert paper.train_batch_size * paper.gradient_accumulation_steps == 4
    mine = db.parse_args(["--recipe", "moslora_paper", "--learning_rate", "3e-4", "--train_batch_size", "2",
                          "--mixer_init", "identity"])
    assert (mine.learning_rate, mine.gradient_accumulation_steps, mine.mixer_init) == (3e-4, 2, "identity")
    lora = db.parse_args(["--recipe", "moslora_paper", "--adapter", "lora"])
    assert lora.mixer_init is None  # lora has no mixer
    default = db.parse_args([])
    assert default.max_train_steps == db.EMBEDDED_MAX_STEPS and default.output_dir == "runs/dreambooth-sdxl-moslora"


def test_bad_instance_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path / "o1", instance=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        run(tmp_path / "o2", instance=tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="no readable image.*broken.png"):
        run(tmp_path / "o3", instance=junk)
    tiny_models.write_cat_photos(junk, n=1, size=32)
    with caplog.at_level("WARNING"):
        assert len(db.list_images(junk, "subject", "--instance_data_dir")) == 1
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text


def test_bad_resolution_rank_and_resume(tmp_path: Path, instance_dir: Path, trained: Runs) -> None:
    with pytest.raises(ValueError, match="not divisible by the VAE factor 4"):
        run(tmp_path / "r", "--resolution", "33", "--max_train_steps", "1", instance=instance_dir)
    with pytest.raises(TargetError, match="rank 65 is larger than"):
        run(tmp_path / "k", "--rank", "65", "--max_train_steps", "1", instance=instance_dir)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run(tmp_path / "m", "--resume_from_checkpoint", "checkpoint-7", instance=instance_dir)
    lora_out = str(trained["lora"]["output_dir"])
    with pytest.raises(ConfigError, match="belongs to a --adapter lora run"):
        db.main(db.parse_args([*FAST, "--adapter", "moslora", "--output_dir", lora_out,
                               "--instance_data_dir", str(instance_dir), "--resume_from_checkpoint", "latest"]))


def test_nonfinite_loss_stops_naming_the_module_and_keeps_checkpoint(tmp_path: Path, instance_dir: Path) -> None:
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=r"non-finite .* at step \d+; first NaN/inf appears in .*unet\.") as err:
        run(out, "--adapter", "lora", "--learning_rate", "1e30", "--max_grad_norm", "0", "--max_train_steps", "6",
            "--checkpointing_steps", "1", "--num_validation_images", "0", instance=instance_dir)
    message = str(err.value)
    failed = int(re.search(r"at step (\d+)", message).group(1))
    kept = CheckpointManager(out, "lora").checkpoints()
    assert kept and int(kept[-1].name.split("-")[1]) == failed - 1  # every good step was checkpointed
    assert f"{kept[-1]} is kept" in message
    assert not (out / "unet").exists()


# -- the default subject: the held-out digit 9 on the shipped digits SDXL -----------------------------
def test_default_digit_subject_learns_the_nine(tmp_path: Path) -> None:
    """No data flag: 5 test-split scans of 9, 'a handwritten digit sks', prior preservation on 'a handwritten
    digit'. Fewer class/eval images than the headline run; fidelity must beat the base's (which draws no 9)."""
    out = tmp_path / "nine"
    args = db.parse_args(["--adapter", "lora", "--output_dir", str(out), "--report_to", "none", "--num_class_images", "8",
                          "--class_inference_steps", "8", "--num_validation_images", "2", "--validation_inference_steps",
                          "8", "--num_fidelity_images", "10", "--prior_images_per_digit", "1", "--seed", "0"])
    assert args.with_prior_preservation and args.class_prompt == "a handwritten digit"
    assert args.instance_prompt == "a handwritten digit sks" and args.eval_subject_digit == 9
    result = db.main(args)
    q = result["quality"]
    assert len(list((out / "instance_images").glob("*.png"))) == db.DIGIT_SUBJECT_IMAGES
    assert q["adapter_subject_fidelity"] > q["base_subject_fidelity"] + 0.3, q
    assert json.loads((out / "quality.json").read_text()) == q
    card = (out / "README.md").read_text()
    assert "subject fidelity" in card and "prior preservation" in card
    from PIL import Image

    grid = out / "validation" / f"step-0-vs-{result['global_step']}.png"
    assert grid.name in card and Image.open(grid).size == (64, 64)  # 2 images x (step 0 row, final row)
    cat = db.parse_args(["--default_subject", "cat"])  # the cat photos stay one flag away
    assert cat.instance_prompt == "a photo of sks cat" and not cat.with_prior_preservation
