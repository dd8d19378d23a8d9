"""The shipped tiny SDXL pretrained on handwritten digits, and the digit metric that judges it.

mm_subspace/eval/digits.py: the fixed split, the image round trip, the classifier (SVC on the train
split), prompt accuracy and subject fidelity. mm_subspace/weights/tiny-sdxl-digits: its files match
the manifest, it is what tiny_sdxl_path() returns, it draws the digits it is asked for, and a
corrupt file is an error (never a silently random model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mm_subspace import shipped
from mm_subspace import tiny_models as tm
from mm_subspace.errors import ConfigError, ShippedModelError
from mm_subspace.eval import digits as D

# ship time: 1.00 on 180 images at the default sampler (manifest); the sample below (27 images, 10 Euler
# steps, seed 1) measured 27/27 = 1.00 when the model was shipped; the threshold leaves room for 4 misses
PROMPT_ACCURACY_SAMPLE_THRESHOLD = 0.85


@pytest.fixture(scope="module")
def pipe(one_thread):
    p = tm.tiny_sdxl_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_split_is_fixed_stratified_and_nine_is_held_out() -> None:
    x_tr, y_tr, x_te, y_te = D.digits_split()
    assert (len(x_tr), len(x_te)) == (1347, 450) and x_tr.shape[1:] == (8, 8)
    assert np.bincount(y_te).min() >= 43  # stratified: every digit ~10 % of the test part (43-46 scans)
    assert D.digits_split()[0] is x_tr  # one split per process, shared by pretraining, metric and DreamBooth
    assert D.SUBJECT_DIGIT == 9 and 9 not in D.PRETRAIN_DIGITS
    subject = D.subject_images(5)
    assert len(subject) == 5 and subject[0].size == (32, 32)
    assert (D.digit_classifier().predict(subject) == 9).all()


def test_round_trip_and_ink_polarity() -> None:
    x_tr = D.digits_split()[0][:50]
    back = D.to_8x8(D.digit_images(x_tr)).reshape(-1, 8, 8)
    assert np.abs(back - x_tr).mean() < 1.5  # bilinear up + area down blurs a little, no more
    white = np.ones((32, 32, 3), dtype=np.float32)  # float image in [0, 1]: blank paper
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    assert D.to_8x8([white]).max() == 0 and D.to_8x8([black]).min() == 16  # dark ink on white = ink high


def test_classifier_test_accuracy() -> None:
    clf = D.digit_classifier()
    # SVC(gamma=0.001) on the stratified 75/25 split: 0.991 on raw scans (ENVIRONMENT.md); ours is
    # trained and tested after the 8 -> 32 -> 8 image round trip
    assert clf.test_accuracy >= 0.98, clf.test_accuracy
    assert clf.raw_test_accuracy >= 0.95, clf.raw_test_accuracy


def test_metric_bad_input() -> None:
    with pytest.raises(ConfigError, match=r"digits must be whole numbers 0..9, got \[10\]"):
        D.prompt_accuracy(object(), [3, 10])
    with pytest.raises(ConfigError, match="no digits given"):
        D.prompt_accuracy(object(), [])
    with pytest.raises(ConfigError, match="n_per_digit must be a whole number >= 1"):
        D.prompt_accuracy(object(), [1], n_per_digit=0)
    with pytest.raises(ConfigError, match=r"got \[-1\]"):
        D.subject_fidelity(object(), target=-1)
    with pytest.raises(ConfigError, match="n must be a whole number >= 1"):
        D.subject_fidelity(object(), n=0)
    with pytest.raises(ConfigError, match="only 45 scans of 9"):
        D.subject_images(46)
    with pytest.raises(ConfigError, match="no images"):
        D.to_8x8([])


def test_default_is_the_verified_shipped_model() -> None:
    folder = tm.tiny_sdxl_path()
    assert folder == shipped.shipped_path("tiny-sdxl-digits")
    manifest = shipped.read_manifest(folder)
    assert manifest["data"]["held_out"] == 9 and 9 not in manifest["data"]["digits"]
    assert manifest["command"].startswith("accelerate launch training/pretrain_tiny_sdxl.py")
    assert manifest["metrics"]["prompt_accuracy_images"] >= 90
    assert sum(e["bytes"] for e in manifest["files"].values()) < 30e6
    assert all(e["bytes"] > 0 for e in manifest["files"].values())
    # same architecture as the random builder, other weights
    import json

    random_cfg = json.loads((tm.tiny_sdxl_path(pretrained=False) / "unet" / "config.json").read_text())
    shipped_cfg = json.loads((folder / "unet" / "config.json").read_text())
    drop = {"_diffusers_version", "_name_or_path"}
    assert {k: v for k, v in random_cfg.items() if k not in drop} == {k: v for k, v in shipped_cfg.items() if k not in drop}


def test_corrupt_shipped_file_is_an_error_not_a_random_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS_DIR / "tiny-sdxl-digits", copy / "tiny-sdxl-digits")
    target = copy / "tiny-sdxl-digits" / "unet" / "diffusion_pytorch_model.safetensors"
    expected = shipped.read_manifest(copy / "tiny-sdxl-digits")["files"]["unet/diffusion_pytorch_model.safetensors"]
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", copy)
    target.write_bytes(target.read_bytes()[: expected["bytes"] // 2])
    with pytest.raises(ShippedModelError, match="diffusion_pytorch_model.safetensors has .* bytes") as info:
        tm.tiny_sdxl_pipeline()
    assert expected["sha256"] in str(info.value)
    original = Path(shipped.__file__).parent / "weights" / "tiny-sdxl-digits"
    shutil.copyfile(original / "unet" / "diffusion_pytorch_model.safetensors", target)
    config = copy / "tiny-sdxl-digits" / "vae" / "config.json"
    config.write_text(config.read_text().replace('"in_channels": 3', '"in_channels": 1'))  # same size, other bytes
    with pytest.raises(ShippedModelError, match=r"vae/config.json has sha256 [0-9a-f]{64}, the manifest says"):
        tm.tiny_sdxl_path()


def test_shipped_model_draws_the_prompted_digits(pipe) -> None:
    """A small fixed sample at few steps: 3 images per digit 0-8, 10 Euler steps, guidance 5."""
    result = D.prompt_accuracy(pipe, D.PRETRAIN_DIGITS, n_per_digit=3, seed=1, num_inference_steps=10)
    assert result.n == 27 and len(result.predictions) == 27
    assert result.value >= PROMPT_ACCURACY_SAMPLE_THRESHOLD, (result.value, result.per_digit)
    # the held-out 9 was never seen: asked for by name, the base rarely draws it
    nine = D.prompt_accuracy(pipe, [9], n_per_digit=6, seed=1, num_inference_steps=10)
    assert nine.value < result.value


def test_subject_share_tells_a_drawn_glyph_from_the_digits(tmp_path: Path) -> None:
    """The 11-class nearest-mean reader: the glyph's own images read as the glyph, real digit scans do not."""
    from PIL import Image

    from conftest import draw_triangles

    glyphs = [Image.open(p).convert("RGB").resize((32, 32)) for p in sorted(draw_triangles(tmp_path).glob("*.png"))]
    assert D.subject_share(glyphs, glyphs) == 1.0
    _, _, x_test, y_test = D.digits_split()
    scans = D.digit_images(x_test[:200])
    assert D.subject_share(scans, glyphs) < 0.05
    with pytest.raises(ConfigError, match="subject's own images"):
        D.subject_share(scans, [])
