"""DreamBooth data: the subject's images and captions, per-epoch crops and flips, epochs <-> steps, micro-batches.

Used by :mod:`mm_subspace.training.dreambooth_sdxl`. Every random draw is a function of ``(seed, epoch,
entry)`` or ``(seed, rank, micro step)``, so a resumed run or a ``DataLoader`` with workers yields the same
batches (see :class:`MicroBatches`).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from mm_subspace import tiny_models
from mm_subspace.caption_data import ImageRecord, dataset_records, folder_records
from mm_subspace.eval import digits as digits_eval
from mm_subspace.training_utils import sample_epoch_indices, step_seed

logger = logging.getLogger(__name__)

# --default_subject digit (the embedded model's default): the held-out digit 9, see mm_subspace.eval.digits
DIGIT_SUBJECT_IMAGES = 5
EMBEDDED_INSTANCE_IMAGES = 4  # --default_subject cat


def embedded_instance_folder(folder: Path, resolution: int, subject: str = "digit") -> Path:
    """The embedded default subject, written to ``folder`` once (``--default_subject``).

    ``digit``: real scans of the digit 9 from the digits test split (held out of the embedded model's
    pretraining, see :mod:`mm_subspace.eval.digits`); ``cat``: real cat photos (scikit-image's chelsea, CC0).
    """
    if folder.is_dir():
        return folder
    if subject == "digit":
        folder.mkdir(parents=True)
        for i, image in enumerate(digits_eval.subject_images(DIGIT_SUBJECT_IMAGES, size=resolution)):
            image.save(folder / f"digit9_{i:02d}.png")
        logger.info("wrote %d test-split scans of the digit 9 to %s", DIGIT_SUBJECT_IMAGES, folder)
    else:
        tiny_models.write_cat_photos(folder, n=EMBEDDED_INSTANCE_IMAGES, size=max(resolution, 64))
        logger.info("wrote %d cat photos to %s", EMBEDDED_INSTANCE_IMAGES, folder)
    return folder


def instance_records(args: argparse.Namespace, output_dir: Path, resolution: int, accelerator: Any) -> list[ImageRecord]:
    """The subject's ``(image, caption, source)`` records: ``--dataset_name``, ``--instance_data_dir`` (with
    metadata.jsonl / metadata.csv / .txt captions), or the embedded default. Captions ``None`` mean
    ``--instance_prompt``."""
    if args.dataset_name:
        return dataset_records(args.dataset_name, args.image_column, args.caption_column, args.dataset_config_name,
                               args.cache_dir)
    folder = Path(args.instance_data_dir) if args.instance_data_dir else output_dir / "instance_images"
    if args.instance_data_dir is None and accelerator.is_main_process:
        embedded_instance_folder(folder, resolution, args.default_subject)
    accelerator.wait_for_everyone()
    return folder_records(folder, args.caption_column)


def resize_short_side(images: list[Any], resolution: int, interpolation: str) -> list[Any]:
    """Resize each PIL image so its short side is ``resolution`` (done once; crops and flips are per epoch)."""
    from torchvision import transforms
    from torchvision.transforms import functional as TF

    mode = getattr(transforms.InterpolationMode, interpolation.upper())
    return [TF.resize(image, resolution, interpolation=mode) for image in images]


def augment(image: Any, resolution: int, center_crop: bool, random_flip: bool,
            rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
    """Flip (p = 0.5), crop to ``resolution``², normalise to [-1, 1] (diffusers' DreamBooth order).

    Returns the pixels (3, res, res) and SDXL's ``crop_top_left`` (y, x) micro-conditioning.
    """
    from torchvision.transforms import functional as TF

    if random_flip and rng.random() < 0.5:
        image = TF.hflip(image)
    if center_crop:
        y = max(0, int(round((image.height - resolution) / 2.0)))
        x = max(0, int(round((image.width - resolution) / 2.0)))
    else:
        y = rng.randint(0, image.height - resolution)
        x = rng.randint(0, image.width - resolution)
    image = TF.crop(image, y, x, resolution, resolution)
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5]), (y, x)


def preprocess(images: list[Any], resolution: int, center_crop: bool, random_flip: bool, interpolation: str,
               seed: int) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Resize, flip, crop, normalise every image once (epoch 0's draw): pixels (n, 3, res, res), original
    sizes (h, w) and crops (y, x). Used for cached latents; training draws crops per epoch with :func:`augment`."""
    sizes = [(image.height, image.width) for image in images]
    out = [augment(image, resolution, center_crop, random_flip, aug_rng(seed, 0, i))
           for i, image in enumerate(resize_short_side(images, resolution, interpolation))]
    return torch.stack([x for x, _ in out]), sizes, [c for _, c in out]


def aug_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The crop/flip randomness of dataset entry ``index`` in ``epoch``: new every epoch, same after a resume."""
    return random.Random(step_seed(seed, 0xA06, epoch, index))


def schedule(args: argparse.Namespace, n_instance: int, n_class: int, world: int) -> dict[str, int]:
    """Epochs <-> steps as diffusers converts them; fills ``args.max_train_steps``, ``num_train_epochs``,
    ``checkpointing_steps`` and (from ``--validation_epochs``) ``validation_steps``.

    One epoch is ``max(instances × repeats, class images)`` samples (diffusers' DreamBooth data set length),
    i.e. ``ceil(samples / (batch × processes))`` micro-batches, i.e. ``ceil(micro-batches / accumulation)``
    optimizer steps. ``--max_train_steps`` wins over ``--num_train_epochs``.
    """
    samples = max(n_instance * args.repeats, n_class if args.with_prior_preservation else 0)
    micro = math.ceil(samples / (args.train_batch_size * world))
    per_epoch = math.ceil(micro / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / per_epoch)
    if args.checkpointing_steps is None:
        args.checkpointing_steps = min(500, max(1, args.max_train_steps // 2))
    if args.validation_epochs:
        args.validation_steps = args.validation_epochs * per_epoch
    logger.info(
        "steps: %d samples per epoch (%d instance images x %d repeats%s) / (batch %d x %d processes) = %d micro-batches "
        "/ accumulation %d = %d steps per epoch; %d steps = %d epochs%s", samples, n_instance, args.repeats,
        f", {n_class} class images" if args.with_prior_preservation else "", args.train_batch_size, world, micro,
        args.gradient_accumulation_steps, per_epoch, args.max_train_steps, args.num_train_epochs,
        f"; validation every {args.validation_epochs} epochs = {args.validation_steps} steps" if args.validation_epochs else "")
    return {"samples_per_epoch": samples, "steps_per_epoch": per_epoch, "max_train_steps": args.max_train_steps,
            "num_train_epochs": args.num_train_epochs}


class MicroBatches(torch.utils.data.Dataset):
    """Item ``k`` = the CPU side of micro step ``k`` on this rank: cropped/flipped pixels (or the entries of
    cached latents), SDXL ``add_time_ids`` and prompt rows. A pure function of ``(seed, k, rank)``, so a
    ``DataLoader`` with workers, or a resumed run, yields exactly the same batches.

    Entry ``e`` of an epoch is instance image ``e % n`` (``--repeats`` entries per image); its crop and
    flip are drawn from :func:`aug_rng` ``(seed, epoch, e)``: new every epoch. Class images are cropped
    (never flipped, as diffusers) from their own seeded stream.
    """

    def __init__(self, args: argparse.Namespace, resolution: int, images: list[Any], rows: list[int],
                 class_images: list[Any], class_row: int, rank: int, world: int) -> None:
        self.args, self.resolution, self.rank, self.world = args, resolution, rank, world
        self.sizes = [(im.height, im.width) for im in images]
        self.images = resize_short_side(images, resolution, args.image_interpolation_mode)
        self.rows, self.class_row = rows, class_row
        self.class_sizes = [(im.height, im.width) for im in class_images]
        self.class_images = resize_short_side(class_images, resolution, args.image_interpolation_mode)
        self.entries = len(images) * args.repeats
        self.crops: dict[str, list[tuple[int, int]]] = {}  # epoch-0 crops of cached latents

    def __len__(self) -> int:
        return self.args.max_train_steps * self.args.gradient_accumulation_steps

    def _draw(self, kind: str, entry: int, epoch: int) -> tuple[torch.Tensor | None, list[int]]:
        a = self.args
        images, sizes, flip, seed = ((self.images, self.sizes, a.random_flip, a.seed) if kind == "instance" else
                                     (self.class_images, self.class_sizes, False, a.seed + 1))
        i = entry % len(images)
        if a.cache_latents:
            pixels, crop = None, self.crops[kind][entry]
        else:
            pixels, crop = augment(images[i], self.resolution, a.center_crop, flip, aug_rng(seed, epoch, entry))
        return pixels, [*sizes[i], *crop, self.resolution, self.resolution]  # add_time_ids (Podell et al. 2023, §2.2)

    def cache_pixels(self) -> dict[str, torch.Tensor]:
        """Epoch-0 pixels of every entry, for ``--cache_latents`` (records the crops they used)."""
        out = {}
        kinds = [("instance", self.images, self.entries, self.args.random_flip, self.args.seed)]
        if self.args.with_prior_preservation:
            kinds.append(("class", self.class_images, len(self.class_images), False, self.args.seed + 1))
        for kind, images, n, flip, seed in kinds:
            drawn = [augment(images[e % len(images)], self.resolution, self.args.center_crop, flip, aug_rng(seed, 0, e))
                     for e in range(n)]
            self.crops[kind] = [c for _, c in drawn]
            out[kind] = torch.stack([x for x, _ in drawn])
        return out

    def __getitem__(self, micro_step: int) -> dict[str, torch.Tensor]:
        a = self.args
        draws = [("instance", e, ep) for ep, e in
                 sample_epoch_indices(self.entries, a.train_batch_size, micro_step, self.rank, self.world, a.seed)]
        if a.with_prior_preservation:
            draws += [("class", e, ep) for ep, e in sample_epoch_indices(
                len(self.class_images), a.train_batch_size, micro_step, self.rank, self.world, a.seed + 1)]
        drawn = [self._draw(kind, e, ep) for kind, e, ep in draws]
        item = {"time_ids": torch.tensor([t for _, t in drawn], dtype=torch.float32),
                "rows": torch.tensor([self.rows[e % len(self.rows)] if kind == "instance" else self.class_row
                                      for kind, e, _ in draws]),
                "entries": torch.tensor([e for kind, e, _ in draws if kind == "instance"]),
                "class_entries": torch.tensor([e for kind, e, _ in draws if kind == "class"], dtype=torch.long)}
        if not a.cache_latents:
            item["pixels"] = torch.stack([x for x, _ in drawn])
        return item
