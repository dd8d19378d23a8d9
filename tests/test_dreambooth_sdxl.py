"""training/dreambooth_sdxl.py on the embedded tiny SDXL: outputs, stock-diffusers parity, resume after
SIGKILL, prior preservation, 2-process CPU run, bad input.

Runs are tiny (32 px, rank 2, 2-4 steps) and shared through module-scoped fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mm_subspace as mms
from conftest import kill_at_first_checkpoint, run_two_cpu_processes
from mm_subspace import tiny_models
from mm_subspace.errors import ConfigError, NonFiniteError, TargetError
from mm_subspace.training import dreambooth_checks as checks
from mm_subspace.training import dreambooth_flags as flags
from mm_subspace.training import dreambooth_report as report
from mm_subspace.training import dreambooth_sdxl as db
from mm_subspace.training.dreambooth_data import DIGIT_SUBJECT_IMAGES
from mm_subspace.training_utils import CheckpointManager, sample_indices

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "dreambooth_sdxl.py"

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
        extra = {"moslora": ["--train_text_encoder", "--output_kohya_format"], "sulora": ["--balance_coef", "0.01"]}.get(method, [])
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
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no tmp leftovers
    for png in (out / "loss_curve.png", out / "validation" / "step-000003.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(out / "validation" / "step-000003.png").size == (512, 256)  # 2 images side by side, 32 px shown at 256
    card = (out / "README.md").read_text()
    assert f"**{method}**" in card and "final loss" in card and "validation/step-0-vs-3.png" in card  # step 0 above step 3
    assert Image.open(out / "validation" / "step-0-vs-3.png").size == (512, 512)  # step 0 above step 3, each row 2 images at 256 px
    assert "--adapter" in card and "loss_curve.png" in card
    exportable = mms.get_method(method).mergeable
    assert (out / "pytorch_lora_weights.safetensors").is_file() == exportable == result["exported"]
    if not exportable:
        assert "not exported to diffusers LoRA" in card


class Pipes:
    """Two tiny pipelines built once per module (ours, stock) and the base images; reset after each use."""

    def __init__(self) -> None:
        self.ours, self.stock = tiny_models.tiny_sdxl_pipeline(), tiny_models.tiny_sdxl_pipeline()
        for pipe in (self.ours, self.stock):
            pipe.set_progress_bar_config(disable=True)
        self.reference = _images(self.ours)

    def parity(self, folder: Path, lora_file: Path) -> None:
        """Stock ``load_lora_weights(lora_file)`` == our adapters loaded from ``folder/<part>``, same seed."""
        loaded = [part for part in ("unet", "text_encoder", "text_encoder_2") if (folder / part).is_dir()]
        try:
            for part in loaded:
                mms.load_adapter(getattr(self.ours, part), folder / part)
            ours = _images(self.ours)
            self.stock.load_lora_weights(str(lora_file))
            theirs = _images(self.stock)
        finally:
            for part in loaded:
                mms.remove_adapter(getattr(self.ours, part), "default")
            self.stock.unload_lora_weights()
        gap = np.abs(ours - theirs).max()
        effect = np.abs(ours - self.reference).max()
        assert gap < 1e-5, gap
        assert effect > 100 * max(gap, 1e-7), (effect, gap)  # the adapter changes the image; parity is not vacuous


@pytest.fixture(scope="module")
def pipes() -> Pipes:
    return Pipes()


@pytest.mark.parametrize("method", ["lora", "moslora"])
def test_export_loads_in_stock_diffusers_and_matches(trained: Runs, pipes: Pipes, method: str) -> None:
    """pytorch_lora_weights.safetensors + stock load_lora_weights == our unmerged adapters, same seed.
    (DoRA: test_edm_scheduler_model_trains_edm_style_with_8bit_adam_and_dora.)"""
    out = Path(trained[method]["output_dir"])
    pipes.parity(out, out)
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder_2.") for k in keys) == (method == "moslora")
    assert not any(k.endswith("lora_magnitude_vector.weight") for k in keys)


def test_kohya_output_loads_in_stock_diffusers(trained: Runs, pipes: Pipes) -> None:
    """--output_kohya_format: the kohya file next to pytorch_lora_weights.safetensors, same images."""
    out = Path(trained["moslora"]["output_dir"])
    kohya = out / db.KOHYA_WEIGHTS
    keys = load_file(kohya)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    pipes.parity(out, kohya)
    assert "pytorch_lora_weights_kohya.safetensors" in (out / "README.md").read_text()


def test_every_checkpoint_loads_in_stock_diffusers(trained: Runs, pipes: Pipes) -> None:
    """checkpoint-2 holds pytorch_lora_weights.safetensors of step 2 (diffusers#6366)."""
    ckpt = Path(trained["lora"]["output_dir"]) / "checkpoint-2"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    pipes.parity(ckpt, ckpt)
    final = load_file(Path(trained["lora"]["output_dir"]) / "pytorch_lora_weights.safetensors")
    step2 = load_file(ckpt / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(final[k], step2[k]) for k in final)  # step 2's weights, not the final ones


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
    # step 1 runs in the child, step 2 in this process: the same intra-op thread count, or CPU sums differ in the last bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    kill_at_first_checkpoint(cmd, killed, timeout=240, env=env)
    assert not (killed / "unet").exists()  # never finished

    resumed = db.main(db.parse_args([*RESUME, "--instance_data_dir", str(instance_dir), "--output_dir", str(killed),
                                     "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]))
    assert resumed["resumed_from"] == killed / "checkpoint-1" and resumed["global_step"] == 2
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
    """Also the real-model path: a pipeline folder (save_pretrained layout) and a separate VAE folder; captioned
    instance images next to class images."""
    out = tmp_path / "prior"
    model = tiny_models.tiny_sdxl_path()
    result = run(out, "--adapter", "lora", "--with_prior_preservation", "--class_prompt", "a photo of a cat",
                 "--num_class_images", "2", "--class_inference_steps", "2", "--max_train_steps", "1",
                 "--num_validation_images", "0", "--cache_latents", "--pretrained_model_name_or_path", str(model),
                 "--pretrained_vae_model_name_or_path", str(model / "vae"), instance=ROOT / "tests" / "data" / "captioned")
    images = sorted((out / "class_images").glob("*.png"))
    assert len(images) == 2 and np.isfinite(result["final_loss"])
    assert len(result["prompts"]) == 4 and result["prompts"][-1] == "a photo of a cat"  # 3 captions + the class prompt
    card = (out / "README.md").read_text()  # the card says the images were trained on their own captions
    assert "| captions | 3 of 3 images trained on their own caption" in card and "their own captions" in card
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["base_model"]["name_or_path"] == str(model)
    from PIL import Image

    assert Image.open(images[0]).size == (32, 32)


# -- two CPU processes -----------------------------------------------------------------------------
def test_two_process_cpu_run_ends_with_identical_adapters(tmp_path: Path, instance_dir: Path) -> None:
    out = tmp_path / "ddp"
    log, digest = run_two_cpu_processes(SCRIPT, [*FAST, "--adapter", "moslora", "--train_text_encoder", "--max_train_steps", "2",
                                         "--num_validation_images", "0", "--checkpointing_steps", "1",
                                         "--instance_data_dir", str(instance_dir), "--output_dir", str(out)], timeout=300)
    assert "Num processes: 2" in log
    # rank 0's saved adapter is the one both ranks hold
    model = tiny_models.tiny_sdxl_pipeline()
    parts = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        mms.load_adapter(getattr(model, part), out / part)
        parts[part] = getattr(model, part)
    from mm_subspace.training_utils import adapters_digest

    assert adapters_digest(parts) == digest
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()  # both ranks' RNG


def test_sample_indices_shard_each_epoch_once() -> None:
    seen = [i for step in range(3) for rank in range(2) for i in sample_indices(6, 1, step, rank, 2, seed=0)]
    assert sorted(seen) == list(range(6))


# -- bad input ---------------------------------------------------------------------------------------
def test_parse_args_errors_and_recipe() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'moslora'"):
        db.parse_args(["--adapter", "moslor"])
    with pytest.raises(ConfigError, match="--mixer_init does not apply to --adapter lora"):
        db.parse_args(["--adapter", "lora", "--mixer_init", "orthogonal"])
    sulora = db.parse_args(["--adapter", "sulora", "--pairing", "index", "--a_init", "kaiming", "--router_temperature", "0.5",
                            "--balance_coef", "0.02"])
    config = db.adapter_config(sulora, "sdxl_unet")
    assert (config.pairing, config.a_init, config.router_temperature, config.balance_coef) == ("index", "kaiming", 0.5, 0.02)
    with pytest.raises(ConfigError, match="--balance_coef does not apply to --adapter lora; it is a flag of sulora"):
        db.parse_args(["--adapter", "lora", "--balance_coef", "0"])
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


def test_digit_subject_defaults_yield_to_flags_recipes_and_other_subjects() -> None:
    """The embedded digit run trains rank 6 with 50 warm-up steps, cosine decay, prior weight 1.5 and adapters on both
    text encoders at lr 2e-3 (chosen with benchmarks/dreambooth_quality.py, docs/dreambooth.md); an explicit flag or a
    recipe wins, and other subjects keep diffusers' defaults (rank 4, constant, no warm-up, weight 1, UNet only,
    text-encoder lr 5e-6)."""
    digit = db.parse_args([])
    assert (digit.lr_scheduler, digit.lr_warmup_steps, digit.prior_loss_weight, digit.max_train_steps) == ("cosine", 50, 1.5, 500)
    assert (digit.rank, digit.alpha, digit.train_text_encoder, digit.text_encoder_lr, digit.learning_rate) == (6, 6.0, True, 2e-3, 2e-3)
    assert db.parse_args(["--rank", "4"]).alpha == 4.0  # alpha follows the rank actually used
    assert digit.checkpointing_steps == 250
    mine = db.parse_args(["--lr_scheduler", "constant", "--prior_loss_weight", "1", "--no-train_text_encoder",
                          "--lr_warmup_steps", "0"])
    assert (mine.lr_scheduler, mine.prior_loss_weight, mine.train_text_encoder, mine.lr_warmup_steps) == ("constant", 1.0, False, 0)
    paper = db.parse_args(["--recipe", "moslora_paper"])
    assert (paper.lr_scheduler, paper.train_text_encoder) == ("constant", False)
    cat = db.parse_args(["--default_subject", "cat"])
    assert (cat.rank, cat.lr_scheduler, cat.lr_warmup_steps, cat.prior_loss_weight) == (4, "constant", 0, 1.0)
    assert (cat.train_text_encoder, cat.text_encoder_lr) == (False, 5e-6)


@pytest.mark.parametrize(("argv", "lr"), [
    (["--adapter", "asylora"], 6e-3),                                     # A frozen: only B trains
    (["--adapter", "sulora"], 6e-3),                                      # A frozen (§3.2): the bank B and the router train
    (["--adapter", "asylora", "--learning_rate", "1e-3"], 1e-3),          # the user's lr wins
    (["--adapter", "lora"], 2e-3),
    (["--adapter", "moslora"], 2e-3),
    (["--adapter", "asylora", "--default_subject", "cat"], 2e-3),         # the digit subject's default only
])
def test_b_only_adapters_default_to_a_larger_lr_on_the_digit_subject(argv: list[str], lr: float) -> None:
    assert db.parse_args(argv).learning_rate == pytest.approx(lr)



def test_bad_instance_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="missing: no such folder"):  # at parse time: one error line from the CLI
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
    with pytest.raises(ValueError, match=r"--resolution 33 is not divisible by 8 .*use 32 or 40"):
        run(tmp_path / "r", "--resolution", "33", "--max_train_steps", "1", instance=instance_dir)
    with pytest.raises(TargetError, match="rank 65 is larger than"):
        run(tmp_path / "k", "--rank", "65", "--max_train_steps", "1", instance=instance_dir)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run(tmp_path / "m", "--resume_from_checkpoint", "checkpoint-7", instance=instance_dir)
    lora_out = str(trained["lora"]["output_dir"])
    with pytest.raises(ConfigError, match="belongs to a --adapter lora run"):
        db.main(db.parse_args([*FAST, "--adapter", "moslora", "--output_dir", lora_out,
                               "--instance_data_dir", str(instance_dir), "--resume_from_checkpoint", "latest"]))


def test_resume_with_other_settings_or_a_broken_checkpoint_fails_before_any_model_loads(
        tmp_path: Path, instance_dir: Path, trained: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import UNet2DConditionModel

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    lora_out = Path(trained["lora"]["output_dir"])  # trained (once per module) before models are forbidden
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_model)
    resume = ["--adapter", "lora", "--output_dir", str(lora_out), "--instance_data_dir", str(instance_dir),
              "--resume_from_checkpoint", "latest"]
    with pytest.raises(ConfigError, match=r"other adapter settings: --rank 2 \(this run: 4\)"):
        db.main(db.parse_args([*FAST, *resume, "--rank", "4"]))
    checkpoint = lora_out / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert [row["step"] for row in state["loss_history"]] == [1, 2]  # the history is JSON, not a pickle
    assert not list(checkpoint.glob("*custom_checkpoint*"))
    copy = tmp_path / "copy"
    copy.mkdir()
    import shutil

    shutil.copytree(checkpoint, copy / "checkpoint-2")
    (copy / "checkpoint-2" / "trainer_state.json").write_text("[2]")
    with pytest.raises(mms.AdapterFileError, match=r"checkpoint-2 cannot be resumed: .*must hold a JSON object, found list.*"
                       "No earlier complete checkpoint is left"):
        db.main(db.parse_args([*FAST, *resume[:2], "--output_dir", str(copy), "--instance_data_dir", str(instance_dir),
                               "--resume_from_checkpoint", "checkpoint-2"]))


def test_float_flags_must_be_finite_and_in_range(capsys: pytest.CaptureFixture) -> None:
    for flag in ("--learning_rate", "--max_grad_norm", "--adam_beta1", "--adam_weight_decay", "--prior_loss_weight",
                 "--snr_gamma", "--noise_offset", "--text_encoder_lr", "--alpha"):
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as exit_:
                db.parse_args([f"{flag}={value}"])
            assert exit_.value.code == 2
            assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err
    for argv, says in ((["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),
                       (["--adam_beta2", "-0.1"], "--adam_beta2 must be in [0, 1)"),
                       (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
                       (["--adam_epsilon", "0"], "--adam_epsilon must be > 0"),
                       (["--adam_weight_decay", "-1"], "--adam_weight_decay must be >= 0"),
                       (["--resolution", "4"], "--resolution 4 is not divisible by 8"),
                       (["--instance_data_dir", "cat/"], "--instance_data_dir cat/: no such folder")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            db.parse_args(argv)
    checks.check_resolution(8, vae_factor=4, unet_factor=2)  # the embedded model's smallest size
    says = "too small for this model: its VAE \\(factor 8\\) and UNet \\(4x downsampling\\) need at least 32 px"
    with pytest.raises(ConfigError, match=says):
        checks.check_resolution(16, vae_factor=8, unet_factor=4)  # SDXL
    with pytest.raises(ConfigError, match="not divisible by the VAE factor 16 of x and 8 .*: use 16 or 32"):
        checks.check_resolution(24, vae_factor=16, vae_path="x")


def test_interrupted_default_subject_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mm_subspace.training import dreambooth_data

    real = dreambooth_data.digits_eval.subject_images

    def killed_after_two(n: int, size: int):
        for i, image in enumerate(real(n, size=size)):
            if i == 2:
                raise KeyboardInterrupt  # the run is stopped while the images are written
            yield image

    folder = tmp_path / "out" / "instance_images"
    monkeypatch.setattr(dreambooth_data.digits_eval, "subject_images", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        dreambooth_data.embedded_instance_folder(folder, 32, "digit")
    assert not folder.exists() and not list(folder.parent.iterdir())
    monkeypatch.setattr(dreambooth_data.digits_eval, "subject_images", real)
    dreambooth_data.embedded_instance_folder(folder, 32, "digit")
    assert len(list(folder.glob("*.png"))) == dreambooth_data.DIGIT_SUBJECT_IMAGES
    assert sorted(p.name for p in folder.parent.iterdir()) == ["instance_images"]


def test_allow_outside_data_reaches_the_folder_reader(tmp_path: Path, instance_dir: Path) -> None:
    from types import SimpleNamespace

    from mm_subspace.training import dreambooth_data

    data = tmp_path / "data"
    tiny_models.write_cat_photos(data, n=1, size=40)
    inside = next(data.glob("*.png")).name
    outside = next(instance_dir.glob("*.png"))
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": inside, "text": "inside"}) + "\n"
                                         + json.dumps({"file_name": str(outside), "text": "a photo of sks cat"}) + "\n")
    solo = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    args = db.parse_args(["--instance_data_dir", str(data)])
    assert args.allow_outside_data is False
    with pytest.raises(mms.errors.DataError, match="outside"):
        dreambooth_data.instance_records(args, tmp_path, 32, solo)
    args = db.parse_args(["--instance_data_dir", str(data), "--allow_outside_data"])
    records = dreambooth_data.instance_records(args, tmp_path, 32, solo)
    assert sorted(r.caption for r in records) == ["a photo of sks cat", "inside"]


def test_new_user_mistakes_end_in_one_error_line(tmp_path: Path) -> None:
    """Run as a new user would (the script itself, offline): a hub id that cannot be fetched and a missing folder
    each end in one `error:` line saying what to do, no traceback, no network retries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    for argv, says in ((["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"],
                        ["'stabilityai/stable-diffusion-xl-base-1.0'", "HF_HUB_OFFLINE", "Pass a local folder", "hf auth login"]),
                       (["--instance_data_dir", "cat/"], ["--instance_data_dir cat/: no such folder"]),
                       (["--pretrained_model_name_or_path", str(tmp_path)], ["has no model_index.json"])):
        proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--output_dir", str(tmp_path / "o"), "--report_to", "none"],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("dreambooth_sdxl.py: error: ") and all(s in last for s in says), last


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


# -- parity with diffusers' DreamBooth SDXL flags (issue 14) -----------------------------------------
CAPTIONED = ROOT / "tests" / "data" / "captioned"


def test_captioned_folder_trains_on_its_captions_with_prodigy_epochs_and_repeats(tmp_path: Path) -> None:
    """metadata.jsonl + a .txt sidecar -> three prompts; 3 images x 2 repeats / batch 2 = 3 steps = 1 epoch;
    Prodigy 2+ steps; a DataLoader worker process builds the batches."""
    result = run(tmp_path / "cap", "--adapter", "lora", "--optimizer", "prodigy", "--learning_rate", "1.0", "--repeats", "2",
                 "--num_train_epochs", "1", "--train_batch_size", "2", "--random_flip", "--num_validation_images", "0",
                 "--dataloader_num_workers", "1", instance=CAPTIONED)
    assert sorted(result["prompts"]) == sorted([
        "a photo of sks cat on a sofa", "a photo of sks cat by a window", "a close-up photo of sks cat"])
    assert (result["samples_per_epoch"], result["steps_per_epoch"], result["global_step"]) == (6, 3, 3)
    assert result["optimizer"] == "Prodigy" and np.isfinite(result["final_loss"])
    b = load_file(tmp_path / "cap" / "unet" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in b.items())  # B left zero: Prodigy stepped


def _edm_model(tmp_path: Path) -> Path:
    """The tiny SDXL with an EDMEulerScheduler (as Playground v2.5 ships): other parts linked, not copied."""
    from diffusers import EDMEulerScheduler

    src, out = tiny_models.tiny_sdxl_path(), tmp_path / "edm_sdxl"
    out.mkdir()
    for child in src.iterdir():
        if child.name not in ("scheduler", "model_index.json"):
            (out / child.name).symlink_to(child)
    EDMEulerScheduler().save_config(str(out / "scheduler"))
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EDMEulerScheduler"]
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def test_edm_scheduler_model_trains_edm_style_with_8bit_adam_and_dora(tmp_path: Path, instance_dir: Path,
                                                                      trained: Runs, pipes: Pipes) -> None:
    """One run, three features: EDM-style training switched on by an EDM scheduler, bitsandbytes' 8-bit AdamW
    (on CPU), and --use_dora whose pytorch_lora_weights.safetensors (lora_magnitude_vector keys) reproduces
    our DoRA through the stock loader."""
    model = _edm_model(tmp_path)
    with pytest.raises(ValueError, match="has an EDM scheduler .*drop --snr_gamma"):
        run(tmp_path / "snr", "--pretrained_model_name_or_path", str(model), "--snr_gamma", "5", instance=instance_dir)
    out = tmp_path / "edm"
    result = run(out, "--adapter", "lora", "--use_dora", "--pretrained_model_name_or_path", str(model),
                 "--use_8bit_adam", "--max_train_steps", "2", "--num_validation_images", "1", instance=instance_dir)
    assert result["edm"] and result["optimizer"] == "AdamW8bit" and np.isfinite(result["final_loss"])
    assert (out / "validation" / "step-000002.png").is_file()  # sampled with the EDM scheduler
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["config"]["method"] == "dora"
    assert result["exported"] and any(k.endswith("lora_magnitude_vector.weight")
                                      for k in load_file(out / "pytorch_lora_weights.safetensors"))
    pipes.parity(out, out)
    assert not trained["lora"]["edm"] and trained["lora"]["optimizer"] == "AdamW"  # the tiny SDXL's Euler: DDPM loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_denoised_recovers_x0_from_the_true_target(prediction_type: str) -> None:
    """Euler (VE) parametrisation x = x0 + σ·ε: the preconditioned output of the ideal model is x0 exactly
    (ε-prediction: F = ε; v-prediction: F = (ε − σ·x0)/sqrt(σ² + 1))."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    index = torch.tensor([0, 500, 999])
    sigmas = scheduler.sigmas[index].view(-1, 1, 1, 1)
    noisy = scheduler.add_noise(x0, eps, scheduler.timesteps[index])
    torch.testing.assert_close(noisy, x0 + sigmas * eps)
    ideal = eps if prediction_type == "epsilon" else (eps - sigmas * x0) / (sigmas**2 + 1) ** 0.5
    torch.testing.assert_close(db.edm_denoised(scheduler, noisy, ideal, sigmas, False), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.edm_inputs(scheduler, noisy, sigmas, False), noisy / (sigmas**2 + 1) ** 0.5)


def test_epochs_repeats_and_validation_epochs_arithmetic() -> None:
    """diffusers' conversion: epoch = max(instances x repeats, class images) samples; steps = ceil(ceil(samples /
    (batch x processes)) / accumulation); --max_train_steps wins over --num_train_epochs."""
    args = db.parse_args(["--default_subject", "cat", "--num_train_epochs", "3", "--repeats", "3", "--train_batch_size", "2",
                          "--gradient_accumulation_steps", "2", "--validation_epochs", "2"])
    assert args.max_train_steps is None
    steps = db.schedule(args, n_instance=5, n_class=0, world=2)
    # 15 samples / (2 x 2) = 4 micro-batches / 2 = 2 steps per epoch
    assert steps == {"samples_per_epoch": 15, "steps_per_epoch": 2, "max_train_steps": 6, "num_train_epochs": 3}
    assert args.validation_steps == 4 and args.checkpointing_steps == 3
    prior = db.parse_args(["--default_subject", "cat", "--num_train_epochs", "1", "--with_prior_preservation", "--class_prompt", "a cat"])
    assert db.schedule(prior, n_instance=5, n_class=100, world=1)["max_train_steps"] == 100
    wins = db.parse_args(["--default_subject", "cat", "--num_train_epochs", "9", "--max_train_steps", "7"])
    assert db.schedule(wins, n_instance=4, n_class=0, world=1) == {
        "samples_per_epoch": 4, "steps_per_epoch": 4, "max_train_steps": 7, "num_train_epochs": 2}
    recipe = db.parse_args(["--default_subject", "cat", "--recipe", "moslora_paper", "--num_train_epochs", "2"])
    assert recipe.max_train_steps is None  # explicit epochs beat the recipe's 500 steps


def test_random_crop_and_flip_are_drawn_per_epoch_and_reproducible() -> None:
    args = db.parse_args(["--random_flip", "--max_train_steps", "8", "--seed", "3", "--default_subject", "cat"])
    images = [im.resize((64, 40)) for im in tiny_models.cat_photos(2, 48)]  # landscape: the crop can move
    make = lambda: db.MicroBatches(args, 32, images, [0, 0], [], 0, rank=0, world=1)  # noqa: E731
    data = make()
    # micro steps 0-1 are epoch 0, 2-3 epoch 1, ...: each image gets a new crop (and flip) every epoch
    crops, pixels = {}, {}
    for k in range(8):
        (entry,) = data[k]["entries"].tolist()
        crops.setdefault(entry, set()).add(tuple(data[k]["time_ids"][0, 2:4].tolist()))
        pixels.setdefault(entry, set()).add(data[k]["pixels"].numpy().tobytes())
    assert all(len(c) > 1 for c in crops.values()) and all(len(p) == 4 for p in pixels.values()), crops
    again = make()
    assert all(torch.equal(data[k]["pixels"], again[k]["pixels"]) for k in range(8))  # a resume draws the same


def test_optimizer_learning_rates_follow_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = {"unet": torch.nn.Linear(2, 2), "text_encoder": torch.nn.Linear(2, 2)}
    args = db.parse_args(["--scale_lr", "--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--train_text_encoder",
                          "--learning_rate", "1e-4", "--default_subject", "cat"])  # the digit subject's own: 2e-3, 1e-3
    assert args.text_encoder_lr == 5e-6  # diffusers' default, not --learning_rate
    lrs = {g["name"]: g["lr"] for g in db.make_optimizer(args, parts, world=2).param_groups}
    assert lrs == {"unet": pytest.approx(1e-4 * 2 * 3 * 2), "text_encoder": 5e-6}  # --scale_lr: --learning_rate only
    prodigy = db.parse_args(["--optimizer", "Prodigy", "--learning_rate", "1", "--train_text_encoder",
                             "--prodigy_decouple", "false"])
    opt = db.make_optimizer(prodigy, parts, world=1)
    assert {g["lr"] for g in opt.param_groups} == {1.0} and opt.defaults["decouple"] is False
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ImportError, match=r'--optimizer prodigy needs the `prodigyopt` library: pip install "mm-subspace\[train\]"'):
        db.make_optimizer(prodigy, parts, world=1)


def test_diffusers_flags_parse_or_refuse_clearly() -> None:
    assert db.parse_args(["--use_dora", "--adapter", "lora"]).adapter == "dora"
    both = db.parse_args(["--use_dora"])  # default moslora -> DoRA with the MoSLoRA mixer (the library's default init)
    assert (both.adapter, both.mixer_init) == ("dora", "orthogonal")
    with pytest.raises(ConfigError, match="--train_text_encoder_ti .* is not supported.*--train_text_encoder"):
        db.parse_args(["--train_text_encoder_ti"])
    with pytest.raises(ConfigError, match="--output_kohya_format needs an adapter that folds to plain LoRA, not sulora"):
        db.parse_args(["--adapter", "sulora", "--output_kohya_format"])
    with pytest.raises(ConfigError, match="not dora: DoRA's magnitude has no kohya slot"):
        db.parse_args(["--adapter", "dora", "--output_kohya_format"])
    with pytest.raises(ValueError, match="one of --validation_steps and --validation_epochs"):
        db.parse_args(["--validation_steps", "2", "--validation_epochs", "1"])
    with pytest.raises(ValueError, match="--hub_token with --report_to wandb"):
        db.parse_args(["--hub_token", "x", "--report_to", "wandb"])
    with pytest.raises(ValueError, match="not defined for --do_edm_style_training"):
        db.parse_args(["--do_edm_style_training", "--snr_gamma", "5"])
    with pytest.raises(SystemExit):
        db.parse_args(["--prodigy_decouple", "maybe"])
    ok = db.parse_args(["--allow_tf32", "--enable_xformers_memory_efficient_attention", "--local_rank", "0",
                        "--prior_generation_precision", "fp16"])
    assert ok.allow_tf32 and ok.prior_generation_precision == "fp16"


def test_diffusers_readme_command_runs_offline_with_a_clear_hub_message(tmp_path: Path, instance_dir: Path) -> None:
    """diffusers' README_sdxl example (with --validation_epochs and --push_to_hub), our model path, tiny sizes.
    Offline: training ends normally, the folder is hub-ready, the log gives the exact upload command."""
    from huggingface_hub import ModelCard

    model, out = tiny_models.tiny_sdxl_path(), tmp_path / "sks-dog"
    cmd = [sys.executable, str(SCRIPT), f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={instance_dir}",
           f"--pretrained_vae_model_name_or_path={model / 'vae'}", f"--output_dir={out}", "--mixed_precision=fp16",
           "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=3",
           "--gradient_accumulation_steps=1", "--learning_rate=1e-4", "--report_to=wandb", "--lr_scheduler=constant",
           "--lr_warmup_steps=0", "--max_train_steps=2", "--validation_prompt=A photo of sks dog in a bucket",
           "--validation_epochs=1", "--seed=0", "--push_to_hub", "--hub_model_id=me/sks-dog",
           "--num_validation_images=1", "--validation_inference_steps=2", "--rank=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "--report_to wandb: not installed, skipped: wandb" in log
    assert "upload it when online with:" in log and f"hf upload me/sks-dog {out} ." in log
    for step in (1, 2):  # 3 images / batch 3 = 1 step per epoch: validation every step
        assert (out / "validation" / f"step-00000{step}.png").is_file()
    card_text = (out / "README.md").read_text()
    assert str(tmp_path) not in card_text and str(tmp_path) not in (out / "training_args.json").read_text()
    assert "hub_token" not in card_text
    card = ModelCard.load(out / "README.md").data
    assert card.instance_prompt == "a photo of sks dog" and card.license == "openrail++"
    assert {"lora", "diffusers", "text-to-image", "template:sd-lora"} <= set(card.tags)
    assert card.widget == [{"text": "A photo of sks dog in a bucket", "output": {"url": "validation/step-000002.png"}}]
    assert card.base_model is None  # a local folder is no hub id
    assert 'load_lora_weights("me/sks-dog")' in card_text


def test_validation_images_reach_every_tracker(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """TensorBoard gets the images as an image summary; a tracker that fails only warns (training goes on)."""
    from types import SimpleNamespace

    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Broken:
        name = "broken"

        def log_images(self, values: dict, step: int) -> None:
            raise RuntimeError("server down")

    tb = TensorBoardTracker("run", str(tmp_path))
    tb.start()  # what accelerator.init_trackers does
    images = tiny_models.cat_photos(2, 16)
    with caplog.at_level("WARNING"):
        report.log_images(SimpleNamespace(trackers=[tb, Broken()]), images, 3, "a photo of sks cat")
    tb.finish()
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert events.Tags()["images"] == ["validation"], events.Tags()
    assert [e.step for e in events.Images("validation")] == [3]
    assert "could not log validation images to broken: server down" in caplog.text


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
    assert len(list((out / "instance_images").glob("*.png"))) == DIGIT_SUBJECT_IMAGES
    assert q["adapter_subject_fidelity"] > q["base_subject_fidelity"] + 0.3, q
    assert json.loads((out / "quality.json").read_text()) == q
    card = (out / "README.md").read_text()
    assert "subject fidelity" in card and "prior preservation" in card
    from PIL import Image

    grid = out / "validation" / f"step-0-vs-{result['global_step']}.png"
    assert grid.name in card and Image.open(grid).size == (512, 512)  # 2 images x (step 0 row, final row), 32 px shown at 256
    cat = db.parse_args(["--default_subject", "cat"])  # the cat photos stay one flag away
    assert cat.instance_prompt == "a photo of sks cat" and not cat.with_prior_preservation


def test_contradictory_or_disagreeing_compat_flags_are_refused(tmp_path: Path) -> None:
    """Flags that used to be accepted and ignored: --use_8bit_adam with Prodigy is an error; --local_rank must
    agree with the rank accelerate runs (checked before any model loads)."""
    with pytest.raises(ConfigError, match="--use_8bit_adam .* does not apply to --optimizer prodigy"):
        db.parse_args(["--optimizer", "prodigy", "--use_8bit_adam"])
    with pytest.raises(ConfigError, match="--local_rank 3 but accelerate runs this process as local rank 0"):
        db.main(db.parse_args([*FAST, "--local_rank", "3", "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out" / "unet").exists()


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed: the flag runs")
def test_xformers_flag_without_xformers_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs xformers .*drop the flag"):
        db.main(db.parse_args([*FAST, "--enable_xformers_memory_efficient_attention", "--output_dir", str(tmp_path)]))


# -- runs that explain themselves --------------------------------------------------------------------
def test_prompts_file_grid_upscaled_and_resolved_training_args(tmp_path, instance_dir):
    """--validation_prompts_file: one image per line with its own seed/steps; 32 px images shown at 256 px; the
    training_args.json of a run on the user's own folder records the size used and no embedded subject."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two lines, one image each\na photo of sks cat --d 5 --s 2\na photo of a dog --n cat --l 3\n")
    out = tmp_path / "run"
    args = db.parse_args(["--report_to", "none", "--rank", "2", "--validation_inference_steps", "2", "--output_dir",
                          str(out), "--max_train_steps", "1", "--instance_data_dir", str(instance_dir),
                          "--validation_prompts_file", str(prompts), "--threads", "1"])
    db.main(args)
    grid = Image.open(out / "validation" / "step-000001.png")
    assert grid.size == (2 * 256, 256)  # 2 lines -> 2 images, each 32 px upscaled x8 (nearest)
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["resolution"] == 32 and recorded["default_subject"] is None and recorded["threads"] == 1
    assert recorded["validation_prompts_file"] == str(prompts.name if os.path.isabs(str(prompts)) else prompts)
    with pytest.raises(ValueError, match=r"prompts.txt, line 1: unknown option --q"):
        prompts.write_text("a cat --q 1\n")
        db.parse_args(["--validation_prompts_file", str(prompts)])
    with pytest.raises(ConfigError, match="--default_subject .* does not apply with --instance_data_dir"):
        db.parse_args(["--default_subject", "cat", "--instance_data_dir", str(instance_dir)])


def test_resolution_far_from_native_warns_with_the_native_size_and_help_states_it():
    warning = checks.resolution_warning(1024, 32, "the embedded model")
    assert "--resolution 1024 is far from the native size 32 px" in warning and "1,024x the pixels" in warning
    assert "Use --resolution 32" in warning
    assert checks.resolution_warning(32, 32, "m") is None and checks.resolution_warning(64, 32, "m") is None
    assert "0.062x" in checks.resolution_warning(8, 32, "m")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = tiny_models.tiny_sdxl_path()
    native = UNet2DConditionModel.load_config(path, subfolder="unet")["sample_size"] * 2 ** (
        len(AutoencoderKL.load_config(path, subfolder="vae")["block_out_channels"]) - 1)
    assert native == flags.EMBEDDED_RESOLUTION == 32
    assert f"{native} for the embedded model" in " ".join(db.build_parser().format_help().split())


def test_threads_default_follows_omp_or_half_the_cores(monkeypatch):
    from mm_subspace.training.script_flags import cpu_threads

    assert cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(None) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cpu_threads(None) == 4 and cpu_threads(None, local_processes=2) == 2 and cpu_threads(None, 16) == 1


def test_resume_restores_the_checkpoints_mixed_precision(tmp_path, instance_dir):
    """An fp16 run resumed without --mixed_precision goes on in fp16 (said in the log); another precision warns.
    Subprocesses: accelerate allows one precision per process."""
    out = tmp_path / "fp16"
    base = [sys.executable, str(SCRIPT), *FAST, "--output_dir", str(out), "--instance_data_dir", str(instance_dir),
            "--num_validation_images", "0", "--checkpointing_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*extra: str) -> str:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    launch("--max_train_steps", "1", "--mixed_precision", "fp16")
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["mixed_precision"] == "fp16"
    log = launch("--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert "--mixed_precision fp16 restored from the checkpoint" in log
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["mixed_precision"] == "fp16"
    log = launch("--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--mixed_precision", "no")
    assert "trained with --mixed_precision fp16, with --mixed_precision no" in log


def test_docs_flag_tables_are_the_help_text():
    """docs/dreambooth.md's flag tables are generated from the parser: every flag, its real default and help."""
    from mm_subspace.training.script_flags import flags_markdown

    docs = (ROOT / "docs" / "dreambooth.md").read_text()
    assert flags_markdown(db.build_parser()) in docs
    assert "| `--resolution` | — | Training image size (square). Default: the model's native size (UNet sample_size × VAE " \
           f"factor: {flags.EMBEDDED_RESOLUTION} for the embedded model" in docs
    assert f"{db.EMBEDDED_MAX_STEPS} steps on the embedded model" in docs and "20 steps (embedded)" not in docs


def test_own_glyph_subject_is_learned_with_the_documented_flags(tmp_path):
    """docs/dreambooth.md's flags for your own small images on the embedded model: five 64 px triangles drawn here
    (no digit) are drawn back for "a handwritten digit sks" — most images read as the triangle, not as any digit
    (mm_subspace.eval.digits.subject_share) — while the base draws digits and the other digits survive."""
    from PIL import Image

    from conftest import draw_triangles
    from mm_subspace.eval import digits as D

    glyphs = draw_triangles(tmp_path / "triangles")
    args = db.parse_args(["--instance_data_dir", str(glyphs), "--output_dir", str(tmp_path / "run"), "--report_to", "none",
                          "--num_validation_images", "0", *OWN_SUBJECT_FLAGS])
    db.main(args)
    pipe = tiny_models.tiny_sdxl_pipeline()
    subject = [Image.open(p).convert("RGB").resize((32, 32)) for p in sorted(glyphs.glob("*.png"))]
    base = D.subject_share(D.generate_images(pipe, [args.instance_prompt] * 20, seed=0), subject)
    mms.load_adapter(pipe.unet, tmp_path / "run" / "unet")
    tuned = D.subject_share(D.generate_images(pipe, [args.instance_prompt] * 20, seed=0), subject)
    prior = D.prompt_accuracy(pipe, D.PRETRAIN_DIGITS, 3, 0).value
    assert base <= 0.1 and tuned > 0.5 and prior >= 0.7, (base, tuned, prior)


#: the flags docs/dreambooth.md gives for your own small images on the embedded model (checked against the docs)
OWN_SUBJECT_FLAGS = ["--instance_prompt", "a handwritten digit sks", "--target_preset", "sdxl_unet_wide",
                     "--train_batch_size", "2", "--with_prior_preservation", "--class_prompt", "a handwritten digit",
                     "--num_class_images", "50", "--max_train_steps", "250"]


def test_own_subject_flags_are_the_documented_ones():
    docs = " ".join((ROOT / "docs" / "dreambooth.md").read_text().replace("\\\n", " ").split())  # joined continuations
    shown = " ".join(f'"{a}"' if " " in a else a for a in OWN_SUBJECT_FLAGS)
    assert shown in docs, shown
