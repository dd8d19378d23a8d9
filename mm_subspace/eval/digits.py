"""Handwritten-digit data and an image-quality metric for the embedded tiny SDXL.

The embedded SDXL (``mm_subspace.tiny_models.tiny_sdxl_path``) is pretrained on scikit-learn's
handwritten digits (1,797 real 8x8 scans, UCI; values 0..16, ink high). Everything that needs
the data goes through this module, so pretraining, the metric and the DreamBooth default share
one fixed split:

* :func:`digits_split` — stratified 75/25 train/test split, ``random_state=0`` (:data:`SPLIT`);
* :func:`digit_images` — 8x8 scans -> RGB images (bilinear upscale, dark ink on white paper);
* :func:`to_8x8` — the way back: grey -> ink, area-downsample to 8x8, values 0..16;
* :func:`digit_classifier` — ``SVC(gamma=0.001)`` on the train part after the same round trip
  (test accuracy in ``.test_accuracy``), the judge of generated images;
* :func:`prompt_accuracy` — fraction of generations for "a handwritten digit <word>" that the
  classifier reads as that digit;
* :func:`subject_fidelity` — fraction of generations for a prompt read as one target digit
  (DreamBooth: "a handwritten digit sks" -> 9).

The digit 9 never enters pretraining (:data:`PRETRAIN_DIGITS` is 0..8): it is the DreamBooth
subject, taken from the *test* part (:func:`subject_images`).

Default sampler for the metric: the pipeline's own scheduler (Euler discrete),
``num_inference_steps=20``, ``guidance_scale=5.0``, images of ``IMAGE_SIZE`` px, generator of
image ``i`` seeded ``seed * 100_003 + i``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_PROMPT",
    "DIGIT_WORDS",
    "IMAGE_SIZE",
    "INSTANCE_PROMPT",
    "PRETRAIN_DIGITS",
    "PROMPT_TEMPLATES",
    "SAMPLER",
    "SPLIT",
    "SUBJECT_DIGIT",
    "DigitClassifier",
    "QualityResult",
    "digit_classifier",
    "digit_images",
    "digit_prompt",
    "digits_split",
    "generate_images",
    "prompt_accuracy",
    "subject_fidelity",
    "subject_images",
    "subject_share",
    "to_8x8",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the fixed split: ``train_test_split(test_size=0.25, stratify=y, random_state=0)``
SPLIT: dict[str, Any] = {"dataset": "sklearn.datasets.load_digits (1,797 UCI 8x8 scans)", "test_size": 0.25,
                         "stratify": True, "random_state": 0}
#: the DreamBooth subject, held out of pretraining entirely
SUBJECT_DIGIT = 9
PRETRAIN_DIGITS = tuple(d for d in range(10) if d != SUBJECT_DIGIT)
IMAGE_SIZE = 32
#: prompts of pretraining; ``{word}`` is the digit's name. The first is the metric's prompt.
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten {word}",
    "the digit {word}",
    "a scan of the handwritten number {word}",
    "{word}, written by hand",
)
CLASS_PROMPT = "a handwritten digit"
INSTANCE_TOKEN = "sks"
INSTANCE_PROMPT = f"{CLASS_PROMPT} {INSTANCE_TOKEN}"
#: default sampler settings of the metric (the pipeline's Euler scheduler)
SAMPLER: dict[str, Any] = {"scheduler": "EulerDiscreteScheduler (the pipeline's)", "num_inference_steps": 20,
                           "guidance_scale": 5.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}


def digit_prompt(digit: int, template: str = PROMPT_TEMPLATES[0]) -> str:
    """``"a handwritten digit seven"`` for 7 (or another of :data:`PROMPT_TEMPLATES`)."""
    _check_digits([digit])
    return template.format(word=DIGIT_WORDS[digit])


def _check_digits(digits: Iterable[int]) -> list[int]:
    digits = list(digits)
    if not digits:
        raise ConfigError("no digits given: pass some of 0..9, e.g. digits=range(9)")
    bad = [d for d in digits if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= 9]
    if bad:
        raise ConfigError(f"digits must be whole numbers 0..9, got {bad}")
    return digits


def _check_count(n: int, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{what} must be a whole number >= 1 (no images, no score), got {n!r}")
    return n


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: 8x8 float arrays (0..16, ink high) and labels, per :data:`SPLIT`.

    1,347 train and 450 test scans. Read-only arrays (shared, cached).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.images.astype("float32"), data.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=SPLIT["test_size"], stratify=y,
                                              random_state=SPLIT["random_state"])
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return x_tr, y_tr, x_te, y_te


def digit_pixels(scans: np.ndarray, size: int = IMAGE_SIZE) -> Any:
    """8x8 scans (n, 8, 8), 0..16 ink high -> float tensor (n, 3, size, size) in [-1, 1], dark ink on white.

    Bilinear upscale (``align_corners=False``); -1 is full ink, +1 blank paper.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(scans, dtype="float32")).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (1.0 - 2.0 * x.clamp(0, 1)).expand(-1, 3, -1, -1)
    return x.contiguous()


def digit_images(scans: np.ndarray, size: int = IMAGE_SIZE) -> list[PIL.Image.Image]:
    """8x8 scans -> RGB PIL images of ``size`` px (see :func:`digit_pixels`)."""
    from PIL import Image

    pixels = ((digit_pixels(scans, size) + 1) * 127.5).round().clamp(0, 255).byte()
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def to_8x8(images: Sequence[Any]) -> np.ndarray:
    """Images (PIL, or float arrays (H, W, 3) in [0, 1]) -> (n, 64) ink values 0..16, area-downsampled.

    Ink is ``16 * (1 - grey)``: dark ink on white paper, as :func:`digit_images` draws it.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    if len(images) == 0:
        raise ConfigError("to_8x8 got no images")
    arrays = []
    for image in images:
        raw = np.asarray(image)
        a = raw.astype("float32") / 255.0 if raw.dtype == np.uint8 else raw.astype("float32")
        arrays.append(a.mean(axis=-1) if a.ndim == 3 else a)
    grey = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    small = F.interpolate(grey, size=(8, 8), mode="area")
    return (16.0 * (1.0 - small.clamp(0, 1))).reshape(len(images), 64).numpy()


@dataclass
class DigitClassifier:
    """An ``SVC(gamma=0.001)`` trained on the digits train split after the image round trip.

    Attributes:
        model: the fitted scikit-learn classifier (input: :func:`to_8x8` features).
        test_accuracy: accuracy on the 450 test scans after the same round trip.
        raw_test_accuracy: accuracy on the raw 8x8 test scans.
    """

    model: Any
    test_accuracy: float
    raw_test_accuracy: float

    def predict(self, images: Sequence[Any]) -> np.ndarray:
        """Digit read in each image (PIL or float arrays)."""
        return self.model.predict(to_8x8(images))


@functools.lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The metric's judge (cached per process; ~0.3 s to fit). See :class:`DigitClassifier`."""
    from sklearn.svm import SVC

    x_tr, y_tr, x_te, y_te = digits_split()
    features_tr = to_8x8(digit_images(x_tr))
    model = SVC(gamma=0.001).fit(features_tr, y_tr)
    accuracy = float((model.predict(to_8x8(digit_images(x_te))) == y_te).mean())
    raw = float((model.predict(x_te.reshape(len(x_te), 64)) == y_te).mean())
    return DigitClassifier(model=model, test_accuracy=accuracy, raw_test_accuracy=raw)


def subject_images(n: int = 5, digit: int = SUBJECT_DIGIT, size: int = IMAGE_SIZE) -> list[PIL.Image.Image]:
    """The first ``n`` scans of ``digit`` in the *test* split, as images (the DreamBooth subject)."""
    _check_count(n, "n")
    _check_digits([digit])
    _, _, x_te, y_te = digits_split()
    scans = x_te[y_te == digit][:n]
    if len(scans) < n:
        raise ConfigError(f"the test split has only {len(scans)} scans of {digit}; ask for n <= {len(scans)}")
    return digit_images(scans, size)


def generate_images(pipe: StableDiffusionXLPipeline, prompts: Sequence[str], seed: int = 0, *,
                    batch_size: int = 30, **sampler: Any) -> list[Any]:
    """Generate one image per prompt; image ``i`` uses a generator seeded ``seed * 100_003 + i``.

    ``sampler`` overrides :data:`SAMPLER` (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``)
    or passes other pipeline arguments.
    """
    import torch

    settings = {k: v for k, v in SAMPLER.items() if k != "scheduler"}
    settings.update(sampler)
    images: list[Any] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        gens = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            images += pipe(chunk, generator=gens, **settings).images
    return images


@dataclass
class QualityResult:
    """A metric's value plus what it was measured on.

    Attributes:
        value: the fraction (0..1).
        n: number of images.
        per_digit: fraction per prompted digit (prompt accuracy) or the histogram of read digits.
        predictions: the digit read in each image, in generation order.
        images: the generated images (kept for grids).
    """

    value: float
    n: int
    per_digit: dict[int, float] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list, repr=False)

    def __float__(self) -> float:
        return self.value


def prompt_accuracy(pipe: StableDiffusionXLPipeline, digits: Iterable[int] = PRETRAIN_DIGITS, n_per_digit: int = 10,
                    seed: int = 0, *, template: str = PROMPT_TEMPLATES[0], **sampler: Any) -> QualityResult:
    """Fraction of generated images the classifier reads as the digit their prompt names.

    ``n_per_digit`` images of ``template`` ("a handwritten digit {word}") for each digit, at the
    default sampler (:data:`SAMPLER`; override with keyword arguments).

    Raises:
        ConfigError: a digit outside 0..9, no digits, or ``n_per_digit < 1``.
    """
    digits = _check_digits(digits)
    _check_count(n_per_digit, "n_per_digit")
    labels = [d for d in digits for _ in range(n_per_digit)]
    images = generate_images(pipe, [digit_prompt(d, template) for d in labels], seed, **sampler)
    read = [int(p) for p in digit_classifier().predict(images)]
    hits = [int(r == d) for r, d in zip(read, labels)]
    per_digit = {d: sum(h for h, label in zip(hits, labels) if label == d) / n_per_digit for d in dict.fromkeys(digits)}
    return QualityResult(value=sum(hits) / len(hits), n=len(hits), per_digit=per_digit, predictions=read,
                         images=images)


def subject_fidelity(pipe: StableDiffusionXLPipeline, prompt: str = INSTANCE_PROMPT, target: int = SUBJECT_DIGIT,
                     n: int = 20, seed: int = 0, **sampler: Any) -> QualityResult:
    """Fraction of ``n`` generations of ``prompt`` the classifier reads as ``target`` (DreamBooth subject fidelity).

    ``per_digit`` holds the share of each digit read (what the images show instead).

    Raises:
        ConfigError: ``target`` outside 0..9 or ``n < 1``.
    """
    _check_digits([target])
    _check_count(n, "n")
    images = generate_images(pipe, [prompt] * n, seed, **sampler)
    read = [int(p) for p in digit_classifier().predict(images)]
    histogram = {d: read.count(d) / n for d in sorted(set(read))}
    return QualityResult(value=read.count(target) / n, n=n, per_digit=histogram, predictions=read, images=images)


def subject_share(images: Sequence[Any], subject_images: Sequence[Any]) -> float:
    """Share of ``images`` that look more like ``subject_images`` than like any digit 0-9.

    The classifier always names a digit, so it cannot say "not a digit". This reader works in the same 8x8 ink
    features (:func:`to_8x8`) with 11 classes — the mean train-split scan of each digit and the mean of the
    subject's own images — and reads each image as the nearest class mean: a learned non-digit subject (a glyph
    drawn by the user) counts only when it is closer to the subject than to every digit.

    Raises:
        ConfigError: no images or no subject images.
    """
    import numpy as np

    if len(subject_images) == 0:
        raise ConfigError("subject_share needs the subject's own images")
    x_train, y_train, _, _ = digits_split()
    means = np.stack([x_train[y_train == d].reshape(-1, 64).mean(0) for d in range(10)]
                     + [to_8x8(subject_images).mean(0)])
    features = to_8x8(images)
    nearest = np.argmin(((features[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return float((nearest == 10).mean())
