#!/usr/bin/env python
"""DreamBooth for SDXL with any mm_subspace adapter (LoRA, MoSLoRA, SuLoRA, ...).

    accelerate launch training/dreambooth_sdxl.py --adapter moslora

With no other flag it runs offline on the embedded default: the tiny SDXL of
``mm_subspace.tiny_models`` (real diffusers/transformers classes, random weights, real CLIP
tokenizers), four real photos of one cat (crops of scikit-image's ``chelsea``) and the prompt
"a photo of sks cat". ``--pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0``
trains the real model.

Modelled on diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (same flag names,
same order in ``main``: accelerator, frozen models, adapters, hooks, optimizer, data, prepare,
loop under ``accumulate``, checkpoints on ``sync_gradients``, validation, save), and beyond it:

* ``--adapter`` takes any registered method; aux losses (SuLoRA balance, MPC) are added to the
  diffusion loss and logged separately as ``aux_loss``.
* Output folder: ``unet/`` (+ ``text_encoder/``, ``text_encoder_2/``) in our format, one folder
  per model part (each ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
  ``mm_subspace.load_adapter(pipe.unet, out / "unet")``); ``pytorch_lora_weights.safetensors``
  (stock ``StableDiffusionXLPipeline.load_lora_weights``) when the method folds to plain LoRA;
  ``README.md`` model card; ``loss_curve.png``; ``validation/step-<N>.png`` grids;
  ``training_state/checkpoint-<N>/`` written atomically.
* Every random draw of a step (data order, VAE sample, noise, timesteps) comes from a generator
  seeded by ``(seed, rank, micro step)``, so ``--resume_from_checkpoint latest`` after a kill
  reproduces the uninterrupted run bit for bit on CPU.
* Parity with diffusers' DreamBooth SDXL scripts (docs/dreambooth.md has the flag-by-flag table):
  per-image captions (``metadata.jsonl`` / ``metadata.csv`` / ``.txt`` sidecars, ``--dataset_name``),
  ``--num_train_epochs`` / ``--repeats`` / ``--validation_epochs``, crops and flips drawn per epoch,
  AdamW / 8-bit AdamW / Prodigy, EDM-style training, ``--output_kohya_format``, a stock-loadable
  ``pytorch_lora_weights.safetensors`` in every checkpoint (DoRA included), a hub-ready model card and
  ``--push_to_hub`` that, offline, ends with the exact upload command.
* ``--recipe moslora_sdxl`` (alias ``moslora_paper``): the MoSLoRA paper's SDXL setting as the official
  script runs it (Wu et al. 2024, §4.3; :mod:`mm_subspace.recipes`). Flags given explicitly still win.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mm_subspace
from mm_subspace import tiny_models
from mm_subspace.caption_data import IMAGE_SUFFIXES, ImageRecord, dataset_records, folder_records, list_images
from mm_subspace.eval import digits as digits_eval
from mm_subspace.errors import ConfigError, MergeError
from mm_subspace.atomic import atomic_write_text
from mm_subspace.compat import enable_activation_checkpointing, require
from mm_subspace.training_utils import (
    METHOD_FLAGS,
    CheckpointManager,
    check_method_flags,
    check_positive,
    LossHistory,
    adapter_summary,
    assert_replicas_in_sync,
    cast_trainable_params,
    check_finite,
    locate_nonfinite,
    nonfinite_parameters,
    param_groups,
    sample_epoch_indices,
    save_image_grid,
    save_loss_curve,
    save_parts,
    step_generator,
    step_seed,
    unwrap,
    write_model_card,
)

logger = logging.getLogger("dreambooth_sdxl")

DEFAULT_INSTANCE_PROMPT = "a photo of sks cat"  # --default_subject cat, or an --instance_data_dir
EMBEDDED_MAX_STEPS = 250  # embedded default: about a minute on 2 free CPU cores (32 px, batch 2 + 2 class images)
# --default_subject digit (the embedded model's default): the held-out digit 9, see mm_subspace.eval.digits
DIGIT_SUBJECT_IMAGES = 5
EMBEDDED_LEARNING_RATE = 2e-3  # the tiny model learns the new digit in a few hundred steps (1e-4 does not move it)
#: defaults of the digit subject (flags given explicitly win); chosen so the headline run stays about a minute
DIGIT_DEFAULTS: dict[str, Any] = {"train_batch_size": 2, "num_class_images": 50, "sample_batch_size": 25,
                                  "class_inference_steps": 20, "target_preset": "sdxl_unet_wide"}
REAL_MAX_STEPS = 500  # the MoSLoRA paper's step count
EMBEDDED_INSTANCE_IMAGES = 4
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2")

#: ``--recipe`` names: the SDXL recipes of mm_subspace.recipes (``moslora_paper`` = ``moslora_sdxl``, kept as an alias)
RECIPES = (*mm_subspace.recipes.list_recipes("sdxl"), *sorted(mm_subspace.recipes.ALIASES))



# --------------------------------------------------------------------------------------------- args
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DreamBooth for SDXL with any mm_subspace adapter. No arguments: the shipped tiny SDXL "
        "pretrained on the digits 0-8 learns the held-out digit 9 from five real scans, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="SDXL hub id or local folder (diffusers layout). Default: the embedded tiny SDXL "
                   "(mm_subspace.tiny_models.tiny_sdxl_path()).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix. Default: the model's vae/.")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    g.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")

    g = parser.add_argument_group("adapter")
    g.add_argument("--adapter", type=str, default="moslora",
                   help="Adapter method: any of mm_subspace.list_methods() (lora, moslora, sulora, ts_mixing, ...).")
    g.add_argument("--rank", type=int, default=4, help="Rank r of the adapter's low-rank factors.")
    g.add_argument("--alpha", type=float, default=None, help="Scale numerator (ΔW scaled by alpha/rank). Default: = rank.")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the adapter input.")
    g.add_argument("--mixer_init", type=str, default=None,
                   help="MoSLoRA mixer init (kaiming_uniform, orthogonal, identity, normal, zero). Only for methods with a mixer_init field.")
    g.add_argument("--num_subspaces", type=int, default=None,
                   help="SuLoRA: number of subspaces the router picks from. Only for methods with a num_subspaces field.")
    g.add_argument("--target_preset", type=str, default="sdxl_unet",
                   help="UNet modules to adapt: a preset name (mm_subspace.list_presets()) or comma-separated module names/suffixes. "
                   "The digit subject defaults to sdxl_unet_wide (attention + feed-forward + time embeddings): with attention "
                   "only, the tiny UNet learns the 9 but loses the other digits.")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also put adapters on both text encoders (targets: --text_encoder_target_preset).")
    g.add_argument("--text_encoder_target_preset", type=str, default="sdxl_text_encoders",
                   help="Text-encoder modules to adapt with --train_text_encoder: preset name or comma-separated names.")

    g = parser.add_argument_group("data")
    g.add_argument("--instance_data_dir", type=str, default=None,
                   help="Folder of subject photos. Default: <output_dir>/instance_images, filled per --default_subject.")
    g.add_argument("--default_subject", type=str, default=None, choices=["digit", "cat"],
                   help="Subject written to <output_dir>/instance_images when --instance_data_dir is not given: 'digit' = "
                   f"{DIGIT_SUBJECT_IMAGES} real scans of the digit 9 from the digits test split (9 is held out of the embedded "
                   "model's pretraining), prompt 'a handwritten digit sks', class prompt 'a handwritten digit', prior "
                   "preservation on; 'cat' = 4 real cat photos (crops of scikit-image's chelsea, CC0), prompt 'a photo of sks "
                   "cat'. Default: digit on the embedded model, cat otherwise.")
    g.add_argument("--instance_prompt", type=str, default=None,
                   help=f"Prompt with the identifier of the subject (the caption of every image that has none). Default: 'a handwritten digit sks' for the digit subject, "
                   f"{DEFAULT_INSTANCE_PROMPT!r} otherwise.")
    g.add_argument("--caption_column", type=str, default=None,
                   help="Caption column of metadata.jsonl/metadata.csv in --instance_data_dir (default: the first of "
                   "text, caption, prompt it has) or of --dataset_name (default: none, every image gets --instance_prompt). "
                   "<image>.txt sidecar files are read too; see docs/dreambooth.md for the precedence rules.")
    g.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Instead of --instance_data_dir: a datasets data set (a folder saved with save_to_disk, a local "
                   "data folder, or a hub id). Needs the `datasets` library (extra: train).")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name, if it has several.")
    g.add_argument("--cache_dir", type=str, default=None, help="Cache folder of downloaded data sets.")
    g.add_argument("--repeats", type=int, default=1, help="How many times each instance image is repeated per epoch.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training image size (square). Default: the model's native size (UNet sample_size × VAE factor: "
                   "64 for the embedded model, 1024 for SDXL). Must be divisible by the VAE factor.")
    g.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop after resizing.")
    g.add_argument("--random_flip", action="store_true",
                   help="Flip each image horizontally with probability 0.5, drawn anew every epoch (like the random crop).")
    g.add_argument("--image_interpolation_mode", type=str, default="lanczos",
                   choices=["lanczos", "bicubic", "bilinear", "nearest"], help="Resize interpolation.")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every image with the VAE once before training (faster steps; the VAE sample and the "
                   "crop/flip of each repeat are then fixed).")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Worker processes that crop, flip and batch the images (0: the main process).")

    g = parser.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=None,
                   help="Add the prior-preservation loss on class images (DreamBooth, Ruiz et al. 2023). Default: on for "
                   "the digit subject (class prompt 'a handwritten digit'), off otherwise.")
    g.add_argument("--class_data_dir", type=str, default=None,
                   help="Folder of class images; missing ones are generated with the base pipeline. "
                   "Default: <output_dir>/class_images.")
    g.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of a cat'.")
    g.add_argument("--num_class_images", type=int, default=100, help="Number of class images to use (and generate if missing).")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    g.add_argument("--class_inference_steps", type=int, default=25, help="Denoising steps per generated class image.")
    g.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="Precision of the pipeline that generates class images. Default: fp16 on a GPU, fp32 otherwise.")

    g = parser.add_argument_group("training")
    g.add_argument("--recipe", type=str, default=None, choices=RECIPES,
                   help="Paper setting from mm_subspace.recipes: moslora_sdxl (alias moslora_paper) = MoSLoRA §4.3 / the "
                   "official script: rank 4, orthogonal mixer, lr 1e-4 constant, batch 1 x accumulation 4, 500 steps, "
                   "50 validation inference steps, no prior preservation, no text-encoder training; lora_sdxl = the "
                   "same with LoRA. Flags given explicitly win.")
    g.add_argument("--train_batch_size", type=int, default=1, help="Batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help=f"Optimizer steps; wins over --num_train_epochs. Default: from --num_train_epochs when given, else "
                   f"{EMBEDDED_MAX_STEPS} on the embedded model, {REAL_MAX_STEPS} otherwise.")
    g.add_argument("--num_train_epochs", type=int, default=None,
                   help="Passes over the data (instance images × --repeats; with prior preservation, at least the class "
                   "images), converted to steps as diffusers does; the arithmetic is logged.")
    g.add_argument("--learning_rate", type=float, default=None,
                   help=f"Learning rate of the adapter parameters. Default: {EMBEDDED_LEARNING_RATE:g} on the embedded model, 1e-4 otherwise.")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6,
                   help="Learning rate of text-encoder adapters (as diffusers; with --optimizer prodigy it is --learning_rate).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply --learning_rate (not --text_encoder_lr, as diffusers) by accumulation × batch size × processes.")
    g.add_argument("--optimizer", type=str.lower, default="adamw", choices=["adamw", "prodigy"],
                   help="AdamW (torch, or bitsandbytes' 8-bit with --use_8bit_adam) or Prodigy (prodigyopt, extra: train; "
                   "use --learning_rate 1.0).")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (extra: quant). AdamW only.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help='Scheduler: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the scheduler.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay of the UNet adapters.")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3, help="AdamW weight decay of text-encoder adapters.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW / Prodigy epsilon.")
    g.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's step-size running-average coefficient. Default: sqrt(beta2).")
    g.add_argument("--prodigy_decouple", type=_bool, default=True, help="Prodigy: AdamW-style decoupled weight decay (true/false).")
    g.add_argument("--prodigy_use_bias_correction", type=_bool, default=True, help="Prodigy: Adam's bias correction (true/false).")
    g.add_argument("--prodigy_safeguard_warmup", type=_bool, default=True,
                   help="Prodigy: leave lr out of the D estimate's denominator during warm-up (true/false).")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR weighting gamma (Hang et al. 2023, §3.4); 5.0 is recommended. Default: plain MSE.")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (per-channel constant added to the noise).")
    g.add_argument("--do_edm_style_training", action="store_true",
                   help="EDM-style training (Karras et al. 2022): sigmas from an Euler scheduler, preconditioned inputs and "
                   "outputs, x0 target. Switched on automatically for a model whose scheduler is an EDM one "
                   "(e.g. Playground v2.5).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Mixed precision; frozen weights are cast to it, adapters stay fp32. Default: accelerate config.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet (and text encoders).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU).")
    g.add_argument("--seed", type=int, default=0, help="Seed of every random draw (models, data order, noise, validation).")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--output_dir", type=str, default=None,
                   help="Output folder. Default: runs/dreambooth-sdxl-<adapter> (the comparison app scans runs/).")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Save a resumable checkpoint (training_state/checkpoint-<step>) every N optimizer steps. "
                   "Default: 500, or half of --max_train_steps when that is less (the embedded default saves at 125 and 250).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='"latest", a checkpoint name (checkpoint-10) or path. "latest" with none starts fresh.')
    g.add_argument("--output_kohya_format", action="store_true",
                   help="Also write pytorch_lora_weights_kohya.safetensors (kohya / A1111 / ComfyUI keys, mixer folded, true alpha).")

    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Upload the output folder (without training_state/ and the photos) to the Hub at the end. Offline, "
                   "the run ends normally and prints the exact upload command.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (user/name). Default: the output folder's name.")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token. Default: the one saved by `hf auth login`.")

    g = parser.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", type=str, default=None,
                   help="Prompt of the validation images. Default: --instance_prompt (diffusers skips validation when it is "
                   "unset; here a final validation grid is always written unless --num_validation_images 0).")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation grid (0 disables validation).")
    g.add_argument("--validation_steps", type=int, default=None,
                   help="Validate every N steps (a grid validation/step-<N>.png each time). A final validation always runs.")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Validate every N epochs (converted to steps; the arithmetic is logged). Not with --validation_steps.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps of validation images.")
    g.add_argument("--eval_subject_digit", type=int, default=None,
                   help="Measure subject fidelity (share of instance-prompt images a digit classifier reads as this digit) and "
                   "prior preservation (prompt accuracy on the other digits 0-8) with mm_subspace.eval.digits after "
                   "training, for the adapter and the base; logged and written to the model card. Default: 9 for the "
                   "digit subject, off otherwise.")
    g.add_argument("--num_fidelity_images", type=int, default=20, help="Instance-prompt images of the subject-fidelity metric.")
    g.add_argument("--prior_images_per_digit", type=int, default=5, help="Images per digit of the prior-preservation metric.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='Tracker: "tensorboard" (offline, <output_dir>/logs), "wandb", "comet_ml", ..., "all" or "none". '
                   "Losses and validation images go to every one that is installed; missing ones are named and skipped.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")

    g = parser.add_argument_group("diffusers compatibility")
    g.add_argument("--use_dora", action="store_true",
                   help="diffusers' spelling of DoRA: --adapter lora becomes dora, --adapter moslora becomes dora with a mixer.")
    g.add_argument("--local_rank", type=int, default=-1, help="Accepted for torch.distributed.launch; accelerate sets the rank.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Accepted and ignored: diffusers already uses PyTorch's memory-efficient SDPA attention.")
    g.add_argument("--train_text_encoder_ti", action="store_true",
                   help="NOT SUPPORTED (pivotal tuning / textual inversion of diffusers' advanced script): refused with an "
                   "error. Use --train_text_encoder.")
    return parser


def _bool(value: str) -> bool:
    """argparse type for true/false flags (diffusers' ``type=bool`` makes "False" true)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags (bad combinations raise ``ValueError`` here, before anything runs)."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    explicit = mm_subspace.recipes.explicit_dests(parser, input_args)  # flags the user passed
    from_recipe: set[str] = set()
    if args.use_dora:  # diffusers' flag: DoRA, keeping the mixer when the adapter had one
        if args.adapter not in ("lora", "moslora", "dora"):
            raise ConfigError(f"--use_dora applies to --adapter lora or moslora (DoRA with a mixer), not {args.adapter}")
        if args.adapter == "moslora" and args.mixer_init is None:
            args.mixer_init = mm_subspace.get_method("moslora").config_class().mixer_init
        args.adapter = "dora"

    mm_subspace.get_method(args.adapter)  # ConfigError with "did you mean" on unknown names

    if args.recipe:
        from_recipe = set(mm_subspace.recipes.apply_recipe_to_args(args.recipe, args, parser, input_args))

    adapter_cls = mm_subspace.get_method(args.adapter)  # the recipe may have changed --adapter
    check_method_flags(args)

    if "num_train_epochs" in explicit and "max_train_steps" not in explicit:
        args.max_train_steps = None  # epochs given on the command line win over a recipe's step count

    check_positive(args, ["rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate",
                     "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "resolution", "snr_gamma",
                     "num_class_images", "sample_batch_size", "validation_inference_steps", "class_inference_steps",
                     "text_encoder_lr", "repeats", "num_train_epochs", "validation_epochs"])
    check_positive(args, ["num_validation_images", "prior_loss_weight", "lr_warmup_steps", "max_grad_norm", "noise_offset",
                     "dataloader_num_workers"], allow_zero=True)
    if args.train_text_encoder_ti:
        raise ConfigError(
            "--train_text_encoder_ti (pivotal tuning: new token embeddings, diffusers' advanced script) is not supported: "
            "this script trains adapters only. Use --train_text_encoder to adapt both text encoders; see docs/dreambooth.md"
        )
    if args.dataset_name and args.instance_data_dir:
        raise ValueError("pass one of --dataset_name and --instance_data_dir, not both")
    if args.validation_steps and args.validation_epochs:
        raise ValueError("pass one of --validation_steps and --validation_epochs, not both")
    if args.do_edm_style_training and args.snr_gamma is not None:
        raise ValueError("--snr_gamma (Min-SNR weighting of DDPM timesteps) is not defined for --do_edm_style_training; drop one")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ValueError("--hub_token with --report_to wandb would expose the token in the run's config (as diffusers "
                         "refuses); log in once with `hf auth login` instead")
    if args.output_kohya_format:
        if not adapter_cls.mergeable or args.adapter == "dora":
            why = "DoRA's magnitude has no kohya slot" if args.adapter == "dora" else adapter_cls.merge_refusal
            raise ConfigError(f"--output_kohya_format needs an adapter that folds to plain LoRA, not {args.adapter}: {why}")
    if args.use_8bit_adam and args.optimizer != "adamw":
        warnings.warn(f"--use_8bit_adam is ignored with --optimizer {args.optimizer}")
    if args.alpha is None:
        args.alpha = float(args.rank)

    if args.default_subject is None:
        args.default_subject = "digit" if args.pretrained_model_name_or_path is None else "cat"
    digit_default = args.default_subject == "digit" and args.instance_data_dir is None and args.dataset_name is None
    if args.with_prior_preservation is None:  # on for the digit subject (before the class-prompt check)
        args.with_prior_preservation = digit_default
    if args.with_prior_preservation and args.class_prompt is None and digit_default:
        args.class_prompt = digits_eval.CLASS_PROMPT
    if digit_default:
        for key, value in DIGIT_DEFAULTS.items():
            if key not in explicit and key not in from_recipe:  # the user's flags and a recipe win
                setattr(args, key, value)
    if args.with_prior_preservation:
        if args.class_prompt is None:
            raise ValueError("--with_prior_preservation needs --class_prompt (e.g. --class_prompt 'a photo of a cat')")
    else:
        if args.class_data_dir is not None:
            warnings.warn("--class_data_dir is ignored without --with_prior_preservation")
        if args.class_prompt is not None:
            warnings.warn("--class_prompt is ignored without --with_prior_preservation")

    args.embedded_model = args.pretrained_model_name_or_path is None
    if args.instance_prompt is None:
        args.instance_prompt = digits_eval.INSTANCE_PROMPT if digit_default else DEFAULT_INSTANCE_PROMPT
    if args.learning_rate is None:
        args.learning_rate = EMBEDDED_LEARNING_RATE if args.embedded_model else 1e-4
    if args.eval_subject_digit is None and digit_default:
        args.eval_subject_digit = digits_eval.SUBJECT_DIGIT
    if args.eval_subject_digit is not None and not 0 <= args.eval_subject_digit <= 9:
        raise ValueError(f"--eval_subject_digit must be a digit 0..9, got {args.eval_subject_digit}")
    check_positive(args, ["num_fidelity_images", "prior_images_per_digit"])
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = EMBEDDED_MAX_STEPS if args.embedded_model else REAL_MAX_STEPS
    if args.checkpointing_steps is None and args.max_train_steps is not None:
        args.checkpointing_steps = min(500, max(1, args.max_train_steps // 2))
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"dreambooth-sdxl-{args.adapter}")
    if args.class_data_dir is None and args.with_prior_preservation:
        args.class_data_dir = os.path.join(args.output_dir, "class_images")
    if args.validation_prompt is None:
        args.validation_prompt = args.instance_prompt
    return args


# --------------------------------------------------------------------------------------------- data
def _targets(spec: str) -> str | list[str]:
    """A preset name stays a string; ``"to_q,to_v"`` becomes a list of module names."""
    if spec in mm_subspace.list_presets():
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"empty target list {spec!r}; presets: {', '.join(mm_subspace.list_presets())}")
    return names


def adapter_config(args: argparse.Namespace, targets: str | list[str]) -> mm_subspace.AdapterConfig:
    """``config_for(args.adapter, ...)`` with the method-specific flags its config has."""
    fields = mm_subspace.get_method(args.adapter).config_class.field_names()
    kwargs: dict[str, Any] = dict(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=targets)
    kwargs.update({f: getattr(args, f) for f in METHOD_FLAGS if f in fields and getattr(args, f) is not None})
    return mm_subspace.config_for(args.adapter, **kwargs)


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


def tokenize(tokenizer: Any, prompt: str | list[str]) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt(text_encoders: list[torch.nn.Module], input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning (``StableDiffusionXLPipeline.encode_prompt``): penultimate hidden states of both
    encoders concatenated (b, 77, d1 + d2), and the pooled projection of the second (b, d_proj)."""
    embeds = []
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.cat(embeds, dim=-1), pooled.reshape(pooled.shape[0], -1)


def generate_class_images(args: argparse.Namespace, model_path: str, class_dir: Path, resolution: int,
                          accelerator: Any) -> None:
    """Fill ``class_dir`` up to ``--num_class_images`` with base-pipeline samples of ``--class_prompt`` (rank 0)."""
    from diffusers import StableDiffusionXLPipeline

    class_dir.mkdir(parents=True, exist_ok=True)
    have = len([p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    missing = args.num_class_images - have
    if missing <= 0:
        return
    logger.info("generating %d class images of %r in %s", missing, args.class_prompt, class_dir)
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, revision=args.revision, variant=args.variant, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    for start in range(have, args.num_class_images, args.sample_batch_size):
        idx = list(range(start, min(start + args.sample_batch_size, args.num_class_images)))
        gens = [torch.Generator().manual_seed(args.seed * 100_003 + i) for i in idx]
        images = pipe([args.class_prompt] * len(idx), generator=gens, height=resolution, width=resolution,
                      num_inference_steps=args.class_inference_steps).images
        for i, image in zip(idx, images):
            image.save(class_dir / f"class_{i:05d}.png")
    del pipe


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


def edm_inputs(scheduler: Any, noisy: torch.Tensor, sigmas: torch.Tensor, edm_scheduler: bool) -> torch.Tensor:
    """EDM input preconditioning (Karras et al. 2022, Table 1, c_in): the scheduler's own for an EDM scheduler,
    else ``x / sqrt(σ² + 1)`` (σ_data = 1, Euler's variance-exploding parametrisation), as diffusers does."""
    if edm_scheduler:
        return scheduler.precondition_inputs(noisy, sigmas)
    return noisy / ((sigmas**2 + 1) ** 0.5)


def edm_denoised(scheduler: Any, noisy: torch.Tensor, output: torch.Tensor, sigmas: torch.Tensor,
                 edm_scheduler: bool) -> torch.Tensor:
    """The x0 estimate from the raw UNet output (Karras et al. 2022, Eq. 7: c_skip·x + c_out·F).

    Euler path (``noisy = x0 + σ·ε``): ε-prediction gives ``x − σ·F``; v-prediction
    ``x/(σ²+1) − σ/sqrt(σ²+1)·F``. An EDM scheduler uses its own ``precondition_outputs``.
    """
    if edm_scheduler:
        return scheduler.precondition_outputs(noisy, output, sigmas)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return output * (-sigmas) + noisy
    if prediction_type == "v_prediction":
        return output * (-sigmas / (sigmas**2 + 1) ** 0.5) + noisy / (sigmas**2 + 1)
    raise ValueError(f"EDM-style training: unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")


def make_optimizer(args: argparse.Namespace, parts: dict[str, torch.nn.Module], world: int) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit) or Prodigy over one group per part, with diffusers' lr rules:
    ``--scale_lr`` scales ``--learning_rate`` only; Prodigy uses ``--learning_rate`` for every group."""
    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * world
    text_lr = args.text_encoder_lr
    if args.optimizer == "prodigy":
        if args.train_text_encoder and text_lr != lr:
            logger.warning("--optimizer prodigy: text encoders use --learning_rate %g too (Prodigy adapts one step "
                           "size; diffusers does the same), not --text_encoder_lr %g", lr, text_lr)
        text_lr = lr
        if lr <= 0.1:
            logger.warning("--optimizer prodigy with --learning_rate %g: Prodigy estimates the step size itself and "
                           "expects a learning rate around 1.0", lr)
    groups = param_groups(parts, {"unet": lr, "*": text_lr},
                          {"unet": args.adam_weight_decay, "*": args.adam_weight_decay_text_encoder})
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "prodigy":
        prodigyopt = require("prodigyopt", "--optimizer prodigy", "train")
        return prodigyopt.Prodigy(groups, betas=betas, beta3=args.prodigy_beta3, eps=args.adam_epsilon,
                                  decouple=args.prodigy_decouple, use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    if args.use_8bit_adam:
        bnb = require("bitsandbytes", "--use_8bit_adam", "quant")
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=args.adam_epsilon)
    return torch.optim.AdamW(groups, betas=betas, eps=args.adam_epsilon)


def log_images(accelerator: Any, images: list[Any], step: int, caption: str) -> None:
    """Validation images to every active tracker (TensorBoard, W&B, Comet, ...); a failing tracker only warns."""
    import numpy as np

    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=f"{i}: {caption}") for i, im in enumerate(images)]},
                            step=step)
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"validation": [np.asarray(i) for i in images]}, step=step)
        except Exception as err:  # noqa: BLE001 - a tracker's failure must not stop training
            logger.warning("could not log validation images to %s: %s", tracker.name, err)


# --------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns ``{"output_dir", "global_step", "final_loss", "final_aux_loss", "digest", "exported",
    "resumed_from"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import (AutoencoderKL, DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # as diffusers: TE1 pooled is unused
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("%s", accelerator.state)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.enable_xformers_memory_efficient_attention:
        logger.info("--enable_xformers_memory_efficient_attention ignored: PyTorch's SDPA attention is used (memory-efficient)")

    # -- 1. everything that can be wrong with the input is checked before any model loads ----------
    model_path = args.pretrained_model_name_or_path or str(tiny_models.tiny_sdxl_path())
    vae_path = args.pretrained_vae_model_name_or_path or model_path
    vae_sub = None if args.pretrained_vae_model_name_or_path else "vae"
    unet_cfg = UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=args.revision)
    vae_cfg = AutoencoderKL.load_config(vae_path, subfolder=vae_sub, revision=args.revision)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    resolution = args.resolution or int(unet_cfg["sample_size"]) * vae_factor
    if resolution % vae_factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by the VAE factor {vae_factor} of {vae_path}: use "
            f"{resolution - resolution % vae_factor or vae_factor} or {resolution - resolution % vae_factor + vae_factor}"
        )
    scheduler_class = DDPMScheduler.load_config(model_path, subfolder="scheduler", revision=args.revision)["_class_name"]
    edm_scheduler = "EDM" in scheduler_class
    if edm_scheduler and not args.do_edm_style_training:
        if args.snr_gamma is not None:
            raise ValueError(f"{model_path} has an EDM scheduler ({scheduler_class}): EDM-style training is used, and "
                             "--snr_gamma is not defined for it; drop --snr_gamma")
        logger.info("%s has an EDM scheduler (%s): EDM-style training switched on", model_path, scheduler_class)
    edm = edm_scheduler or args.do_edm_style_training
    config_unet = adapter_config(args, _targets(args.target_preset))  # ConfigError on bad values
    config_text = adapter_config(args, _targets(args.text_encoder_target_preset)) if args.train_text_encoder else None
    part_names = ["unet", *(TEXT_ENCODER_PARTS if args.train_text_encoder else ())]

    manager = CheckpointManager(output_dir, args.adapter, args.checkpoints_total_limit)
    resume_path = manager.resolve(args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", manager.root)
    resume_step = manager.check_resumable(resume_path, part_names) if resume_path else 0

    instance = instance_records(args, output_dir, resolution, accelerator)
    logger.info("%d instance images, %d with their own caption", len(instance), sum(r.caption is not None for r in instance))

    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir)
        if accelerator.is_main_process:
            generate_class_images(args, model_path, class_dir, resolution, accelerator)
        accelerator.wait_for_everyone()
        classes = list_images(class_dir, "class", "--class_data_dir")[: args.num_class_images]
    steps = schedule(args, len(instance), len(classes) if args.with_prior_preservation else 0, world)

    # -- 2. frozen models ----------------------------------------------------------------------------
    load = dict(revision=args.revision, variant=args.variant)
    tokenizers = [AutoTokenizer.from_pretrained(model_path, subfolder=s, revision=args.revision) for s in ("tokenizer", "tokenizer_2")]
    # transformers loads in the stored dtype (fp16 for the shipped model): load fp32, cast to weight_dtype below
    text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", dtype=torch.float32, **load)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2",
                                                                 dtype=torch.float32, **load)
    vae = AutoencoderKL.from_pretrained(vae_path, subfolder=vae_sub, **load)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", **load)
    scheduler_cls = EDMEulerScheduler if edm_scheduler else EulerDiscreteScheduler if edm else DDPMScheduler
    noise_scheduler = scheduler_cls.from_pretrained(model_path, subfolder="scheduler", revision=args.revision)
    for model in (vae, text_encoder, text_encoder_2, unet):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    for model in (unet, text_encoder, text_encoder_2, vae):  # the VAE stays fp32 (fp16 VAEs overflow to NaN)
        model.to(device)
        if weight_dtype != torch.float32 and model is not vae:
            model.to(dtype=weight_dtype)

    # -- 3. adapters ---------------------------------------------------------------------------------
    mm_subspace.inject(unet, config_unet)  # TargetError (rank too large, bad targets) before training
    parts: dict[str, torch.nn.Module] = {"unet": unet}
    if args.train_text_encoder:
        mm_subspace.inject(text_encoder, config_text)
        mm_subspace.inject(text_encoder_2, config_text)
        parts.update(text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for te in (text_encoder, text_encoder_2):
                enable_activation_checkpointing(te)
    cast_trainable_params(parts.values(), torch.float32)
    for part, text in adapter_summary(parts).items():
        logger.info("%s adapter on %s: %s", args.adapter, part, text)

    # -- 4. optimizer and schedule ---------------------------------------------------------------------
    optimizer = make_optimizer(args, parts, world)
    # accelerate steps a prepared scheduler once per process: scale the horizon as diffusers does
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=args.max_train_steps * world, num_cycles=args.lr_num_cycles,
                                 power=args.lr_power)

    # -- 5. data: images resized once, cropped/flipped per epoch; text embeddings once if frozen ---------
    prompts = list(dict.fromkeys([r.caption or args.instance_prompt for r in instance]))
    prompt_rows = [prompts.index(r.caption or args.instance_prompt) for r in instance]
    if args.with_prior_preservation:
        prompts.append(args.class_prompt)
    class_images = [im for _, im in classes] if args.with_prior_preservation else []
    data = MicroBatches(args, resolution, [r.image for r in instance], prompt_rows, class_images, len(prompts) - 1,
                        rank, world)
    latents_mean = vae_cfg.get("latents_mean")
    latents_std = vae_cfg.get("latents_std")

    def encode_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(x.to(device, dtype=vae.dtype)).latent_dist.sample(generator=generator)
        if latents_mean is not None and latents_std is not None:
            mean = torch.tensor(latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(latents_std).view(1, -1, 1, 1).to(latents)
            return ((latents - mean) * vae.config.scaling_factor / std).to(weight_dtype)
        return (latents * vae.config.scaling_factor).to(weight_dtype)

    cached: dict[str, torch.Tensor] = {}
    if args.cache_latents:  # one VAE sample per entry (each repeat keeps its own epoch-0 crop)
        for key, pixels in data.cache_pixels().items():
            cached[key] = torch.cat([encode_images(chunk, step_generator(args.seed, 0xCAC4E, i, len(cached)))
                                     for i, chunk in enumerate(pixels.split(8))])

    token_ids = [tokenize(tok, prompts) for tok in tokenizers]
    if not args.train_text_encoder:
        with torch.no_grad():
            chunks = [encode_prompt([text_encoder, text_encoder_2], [ids[i:i + 16] for ids in token_ids])
                      for i in range(0, len(prompts), 16)]
            fixed_embeds = (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))

    # -- 6. accelerate: hooks write our adapter format into checkpoints -------------------------------
    history = LossHistory()
    def checkpoint_export(models: dict[str, torch.nn.Module], folder: Path) -> None:
        """Each checkpoint also holds pytorch_lora_weights.safetensors for stock diffusers (diffusers#6366)."""
        try:
            mm_subspace.export_diffusers(folder, **models)
        except MergeError as err:
            logger.debug("checkpoint %s: no diffusers LoRA file (%s)", folder.name, err)

    manager.register_hooks(accelerator, parts, base_model=args.pretrained_model_name_or_path or "mm_subspace.tiny_sdxl",
                           export=checkpoint_export)
    accelerator.register_for_checkpointing(history)
    trained = list(parts)
    prepared = accelerator.prepare(*[parts[n] for n in trained], optimizer, lr_scheduler)
    wrapped = dict(zip(trained, prepared[: len(trained)]))
    optimizer, lr_scheduler = prepared[len(trained):]
    unet_w = wrapped["unet"]
    text_models = [wrapped.get("text_encoder", text_encoder), wrapped.get("text_encoder_2", text_encoder_2)]
    trainable = [p for n in trained for _, p in parts[n].named_parameters() if p.requires_grad]

    if accelerator.is_main_process and args.report_to != "none":
        tracker_cfg = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
                       if k != "hub_token"}
        accelerator.init_trackers(f"dreambooth-sdxl-{args.adapter}", config=tracker_cfg)
        missing = sorted(set(args.report_to.split(",")) - {t.name for t in accelerator.trackers} - {"all"})
        if missing:
            logger.warning("--report_to %s: not installed, skipped: %s (pip install %s)", args.report_to,
                           ", ".join(missing), " ".join(missing))

    global_step = 0
    if resume_path is not None:
        logger.info("resuming from %s (step %d)", resume_path, resume_step)
        accelerator.load_state(str(resume_path))
        global_step = resume_step
        manager.last_saved = resume_path

    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info("***** training: %d instance images, %d steps (%d epochs), batch %d per process x %d processes x %d "
                "accumulation = %d, %s optimizer%s", len(instance), args.max_train_steps, args.num_train_epochs,
                args.train_batch_size, world, args.gradient_accumulation_steps, total_batch, type(getattr(optimizer, "optimizer", optimizer)).__name__,
                ", EDM-style" if edm else "")

    # -- 7. one micro-step: every random draw from step_generator(seed, rank, micro_step) -------------
    def micro_batch(micro_step: int, item: dict[str, torch.Tensor]) -> dict[str, Any]:
        gen = step_generator(args.seed, rank, micro_step)
        if args.cache_latents:
            latents = torch.cat([cached["instance"][item["entries"]],
                                 *([cached["class"][item["class_entries"]]] if args.with_prior_preservation else [])])
            latents = latents.to(device, dtype=weight_dtype)
        else:
            latents = encode_images(item["pixels"], gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=latents.dtype).to(device)
        if args.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen, dtype=latents.dtype)
            noise = noise + args.noise_offset * offset.to(device)
        index = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        batch = dict(latents=latents, noise=noise, rows=item["rows"], time_ids=item["time_ids"].to(device, dtype=weight_dtype))
        if edm:  # Karras et al. 2022: a sigma per sample, the matching (continuous) timestep
            batch["timesteps"] = noise_scheduler.timesteps[index].to(device)
            batch["sigmas"] = noise_scheduler.sigmas[index].to(device, dtype=latents.dtype).view(-1, 1, 1, 1)
        else:
            batch["timesteps"] = index.to(device)
        return batch

    def predict(batch: dict[str, Any], models: list[torch.nn.Module]) -> torch.Tensor:
        rows = batch["rows"]
        if args.train_text_encoder:
            embeds, pooled = encode_prompt(models[1:], [ids[rows] for ids in token_ids])
        else:
            embeds, pooled = fixed_embeds[0][rows.to(fixed_embeds[0].device)], fixed_embeds[1][rows.to(fixed_embeds[1].device)]
        noisy = noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
        inputs = edm_inputs(noise_scheduler, noisy, batch["sigmas"], edm_scheduler) if edm else noisy
        cond = {"time_ids": batch["time_ids"], "text_embeds": pooled.to(weight_dtype)}
        out = models[0](inputs, batch["timesteps"], embeds.to(weight_dtype), added_cond_kwargs=cond, return_dict=False)[0]
        return edm_denoised(noise_scheduler, noisy, out, batch["sigmas"], edm_scheduler) if edm else out

    def diffusion_loss(batch: dict[str, Any], pred: torch.Tensor) -> torch.Tensor:
        prediction_type = noise_scheduler.config.prediction_type
        if edm:  # the preconditioned output estimates x0
            target = batch["latents"]
        elif prediction_type == "epsilon":
            target = batch["noise"]
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])
        else:
            raise ValueError(f"unknown prediction type {prediction_type}")
        squared = (pred.float() - target.float()) ** 2
        if edm and not edm_scheduler:  # diffusers: weight 1/sigma^2 on the Euler-scheduler path
            squared = squared * batch["sigmas"].float() ** -2
        per_sample = squared.mean(dim=(1, 2, 3))
        n = per_sample.shape[0] // 2 if args.with_prior_preservation else per_sample.shape[0]
        per_sample, prior = per_sample[:n], per_sample[n:]  # instance rows first, class rows second (DreamBooth Eq. 2)
        if args.snr_gamma is not None:  # Min-SNR weighting, Hang et al. 2023 Eq. (8), for ε-prediction
            snr = compute_snr(noise_scheduler, batch["timesteps"][:n])
            weight = torch.clamp(snr, max=args.snr_gamma) / snr
            if prediction_type == "v_prediction":
                weight = weight + 1
            per_sample = per_sample * weight
        loss = per_sample.mean()
        if args.with_prior_preservation:
            loss = loss + args.prior_loss_weight * prior.mean()
        return loss

    def where_nonfinite(batch: dict[str, Any]) -> str:
        bad = nonfinite_parameters(parts)
        if bad:
            return f"adapter parameters {bad[:3]}"
        bad = nonfinite_parameters(parts, grads=True)
        if bad:
            return f"gradients of {bad[:3]}"
        unwrapped = [unwrap(accelerator, m) for m in [unet_w, *text_models]]
        name = locate_nonfinite(parts, lambda: predict(batch, unwrapped))
        return f"the output of {name}" if name else "the loss only (every module output was finite: inputs or targets?)"

    # -- 8. validation ---------------------------------------------------------------------------------
    def current_pipeline() -> tuple[Any, dict[str, torch.nn.Module]]:
        """The base pipeline around the models being trained (adapters on), every model in eval mode."""
        models = {n: unwrap(accelerator, wrapped.get(n, m)) for n, m in
                  (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))}
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model_path, vae=vae, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], dtype=weight_dtype, **models, **load
        )
        pipe.set_progress_bar_config(disable=True)
        for m in models.values():
            m.eval()
        return pipe, models

    def log_validation(step: int) -> Path | None:
        if args.num_validation_images == 0:
            return None
        pipe, models = current_pipeline()
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_validation_images)]
        autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            images = pipe(args.validation_prompt, num_images_per_prompt=args.num_validation_images, generator=gens,
                          height=resolution, width=resolution, num_inference_steps=args.validation_inference_steps).images
        for name, m in models.items():
            m.train(name in parts)
        path = save_image_grid(images, output_dir / "validation" / f"step-{step:06d}.png", cols=len(images))
        log_images(accelerator, images, step, args.validation_prompt)
        logger.info("validation grid %s", path)
        return path

    # -- 9. train (a step-0 grid first: the base, as every method starts at ΔW = 0) ----------------------
    first_grid = None
    if global_step == 0 and accelerator.is_main_process:
        first_grid = log_validation(0)
    accelerator.wait_for_everyone()
    loop_started, start_step = time.perf_counter(), global_step
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    for m in wrapped.values():
        m.train()
    last_grid: Path | None = None
    models = [unet_w, *text_models]
    accum = args.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(global_step * accum, args.max_train_steps * accum),
                                         num_workers=args.dataloader_num_workers)
    items = iter(loader)
    while global_step < args.max_train_steps:
        sums = torch.zeros(2, device=device)  # diffusion loss, aux loss over this optimizer step
        for micro in range(args.gradient_accumulation_steps):
            micro_step = global_step * args.gradient_accumulation_steps + micro
            batch = micro_batch(micro_step, next(items))
            with accelerator.accumulate(*wrapped.values()):
                pred = predict(batch, models)
                loss = diffusion_loss(batch, pred)
                aux = sum((mm_subspace.aux_loss(parts[n]) for n in trained), torch.zeros((), device=device))
                terms = accelerator.gather(torch.stack([loss.detach(), aux.detach().float()]).reshape(1, 2)).mean(0)
                check_finite({"loss": terms[0].item(), "aux_loss": terms[1].item()}, global_step + 1,
                             lambda: where_nonfinite(batch), manager.last_saved)
                sums += terms / args.gradient_accumulation_steps
                accelerator.backward(loss + aux)
                for n in trained:  # drop aux terms re-recorded by gradient-checkpointing recomputation
                    mm_subspace.aux_loss(parts[n])
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    check_finite({"grad_norm": float(grad_norm)}, global_step + 1, lambda: where_nonfinite(batch),
                                 manager.last_saved)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        if not accelerator.sync_gradients:  # cannot happen: micro steps are a multiple of accumulation
            raise RuntimeError("gradient accumulation out of step with accelerate")
        global_step += 1
        logs = {"loss": sums[0].item(), "aux_loss": sums[1].item(), "lr": lr_scheduler.get_last_lr()[0]}
        history.append(global_step, **logs)
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", aux=f"{logs['aux_loss']:.3g}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            manager.save(accelerator, global_step)
        if args.validation_steps and global_step % args.validation_steps == 0:
            if accelerator.is_main_process:
                last_grid = log_validation(global_step)
            accelerator.wait_for_everyone()
    progress.close()
    seconds_per_step = (time.perf_counter() - loop_started) / max(1, global_step - start_step)

    # -- 10. save: adapters (our format), diffusers export, validation, curve, card (rank 0 only) ------
    final = {n: unwrap(accelerator, wrapped[n]) for n in trained}
    digest = assert_replicas_in_sync(accelerator, final)
    logger.info("rank %d adapter digest %s", rank, digest)
    if world > 1 and accelerator.is_main_process:
        logger.info("adapters identical on all %d ranks (digest %s)", world, digest)
    exported, export_note = False, ""
    if accelerator.is_main_process:
        save_parts(final, output_dir, args.pretrained_model_name_or_path or "mm_subspace.tiny_sdxl")
        try:
            mm_subspace.export_diffusers(output_dir, **final)
            exported = True
            export_note = ("`pytorch_lora_weights.safetensors`: " + ("PEFT DoRA layout (lora_magnitude_vector), mixer and "
                           "scale folded into B (exact)." if args.adapter == "dora" else
                           "plain LoRA, mixer and scale folded into B (exact)."))
        except MergeError as err:
            (output_dir / "pytorch_lora_weights.safetensors").unlink(missing_ok=True)
            export_note = f"not exported to diffusers LoRA: {err}"
            logger.warning("%s", export_note)
        if args.output_kohya_format:
            try:
                kohya = mm_subspace.export_kohya(output_dir / KOHYA_WEIGHTS, **final)
                export_note += f" `{kohya.name}`: kohya / A1111 / ComfyUI keys, mixer folded, true alpha."
            except (ConfigError, MergeError) as err:  # e.g. a target kohya's SDXL layout cannot name
                logger.error("--output_kohya_format: no kohya file written: %s", err)
                export_note += f" Not exported to kohya: {err}"
        if args.num_validation_images and (last_grid is None or not last_grid.name.endswith(f"{global_step:06d}.png")):
            last_grid = log_validation(global_step)
        start_grid = first_grid or output_dir / "validation" / f"step-{0:06d}.png"
        if last_grid is not None and start_grid.is_file() and start_grid != last_grid:
            last_grid = _stack_grids([start_grid, last_grid], output_dir / "validation" / f"step-0-vs-{global_step}.png")
        quality = None
        if args.eval_subject_digit is not None:
            quality = _digit_quality(args, current_pipeline()[0], resolution)
            for name, m in zip(("unet", "text_encoder", "text_encoder_2"), (unet, text_encoder, text_encoder_2)):
                m.train(name in parts)
            accelerator.log({f"quality/{k}": v for k, v in quality.items() if isinstance(v, float)}, step=global_step)
            atomic_write_text(output_dir / "quality.json", json.dumps(quality, indent=2) + "\n")
        curve = save_loss_curve(history, output_dir / "loss_curve.png", f"DreamBooth SDXL, {args.adapter}")
        atomic_write_text(output_dir / "training_args.json", json.dumps(public_flags(args), indent=2, default=str) + "\n")
        _model_card(args, output_dir, history, global_step, total_batch, world, export_note, last_grid, curve, final,
                    quality)
        logger.info("saved %s adapter to %s", args.adapter, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    hub = push_to_hub(args, output_dir) if args.push_to_hub and accelerator.is_main_process else None
    return {"output_dir": output_dir, "global_step": global_step, "final_loss": history.last("loss"),
            "quality": quality if accelerator.is_main_process else None, "seconds_per_step": seconds_per_step,
            "final_aux_loss": history.last("aux_loss"), "digest": digest, "exported": exported, "resumed_from": resume_path,
            "edm": edm, "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__, "hub": hub,
            "prompts": prompts, **steps}


#: files of the output folder that are not uploaded (resumable state, the user's photos)
HUB_EXCLUDE = ("training_state/*", "instance_images/*", "class_images/*")


def hub_repo_id(args: argparse.Namespace) -> str:
    return args.hub_model_id or Path(args.output_dir).resolve().name


def push_to_hub(args: argparse.Namespace, output_dir: Path) -> str:
    """Upload ``output_dir`` to the Hub; on any failure (offline, no token) log the exact command and return it.

    Never raises: training is done and saved, so a failed upload must not lose or hide it.
    """
    repo_id = hub_repo_id(args)
    excludes = " ".join(f"--exclude {shlex.quote(e)}" for e in HUB_EXCLUDE)
    command = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(output_dir))} . {excludes}"
    try:
        from huggingface_hub import create_repo, upload_folder

        repo = create_repo(repo_id, exist_ok=True, token=args.hub_token)
        upload_folder(repo_id=repo.repo_id, folder_path=str(output_dir), token=args.hub_token,
                      commit_message="End of training", ignore_patterns=list(HUB_EXCLUDE))
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode: all end in the same advice
        message = (f"--push_to_hub: upload to {repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                   f"Training finished and {output_dir} is complete and hub-ready; upload it when online with:\n    {command}")
        logger.error("%s", message)
        return message
    message = f"--push_to_hub: uploaded {output_dir} to https://huggingface.co/{repo.repo_id}"
    logger.info("%s", message)
    return message


def _public(value: Any) -> Any:
    """A flag value for files that may be published: absolute local paths become their last component."""
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def public_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag except secrets and internals, with local absolute paths shortened (model card, training_args.json)."""
    return {k: _public(v) for k, v in vars(args).items() if k not in ("embedded_model", "hub_token")}


def _stack_grids(paths: list[Path], out: Path) -> Path:
    """The validation grids of ``paths`` one above the other (step 0 on top), saved as ``out``."""
    from PIL import Image

    grids = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height
    return save_image_grid([canvas], out, cols=1)


def _digit_quality(args: argparse.Namespace, pipe: Any, resolution: int) -> dict[str, Any]:
    """Subject fidelity and prior preservation (``mm_subspace.eval.digits``) with the adapters on, and for the base.

    Fidelity: share of ``--num_fidelity_images`` instance-prompt images read as ``--eval_subject_digit``.
    Prior preservation: prompt accuracy on the digits 0-8 other than it (``--prior_images_per_digit`` each).
    """
    started = time.time()
    target = args.eval_subject_digit
    others = [d for d in digits_eval.PRETRAIN_DIGITS if d != target]
    sampler = dict(height=resolution, width=resolution)
    result: dict[str, Any] = {"subject_digit": target, "instance_prompt": args.instance_prompt, "seed": args.seed,
                              "sampler": {**digits_eval.SAMPLER, **sampler}, "fidelity_images": args.num_fidelity_images,
                              "prior_images": len(others) * args.prior_images_per_digit,
                              "classifier_test_accuracy": round(digits_eval.digit_classifier().test_accuracy, 4)}
    models = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    for label in ("adapter", "base"):
        with contextlib.ExitStack() as stack:
            if label == "base":
                for m in models:
                    if mm_subspace.list_adapters(m):
                        stack.enter_context(mm_subspace.disable_adapters(m))
            fid = digits_eval.subject_fidelity(pipe, args.instance_prompt, target, args.num_fidelity_images, args.seed,
                                               **sampler)
            prior = digits_eval.prompt_accuracy(pipe, others, args.prior_images_per_digit, args.seed, **sampler)
        result[f"{label}_subject_fidelity"] = fid.value
        result[f"{label}_reads_for_instance_prompt"] = {str(k): v for k, v in fid.per_digit.items()}
        result[f"{label}_prior_preservation"] = prior.value
    result["seconds"] = round(time.time() - started, 1)
    logger.info("subject fidelity %.2f (base %.2f), prior preservation %.2f (base %.2f) [%s]",
                result["adapter_subject_fidelity"], result["base_subject_fidelity"], result["adapter_prior_preservation"],
                result["base_prior_preservation"], "mm_subspace.eval.digits")
    return result


def _model_card(args: argparse.Namespace, output_dir: Path, history: LossHistory, steps: int, total_batch: int,
                world: int, export_note: str, grid: Path | None, curve: Path, parts: dict[str, torch.nn.Module],
                quality: dict[str, Any] | None = None) -> None:
    name = args.pretrained_model_name_or_path
    local = name is not None and (os.path.isabs(name) or os.path.exists(name))
    hub_base = None if name is None or local else name  # front-matter base_model: hub ids only
    base = (f"local folder `{Path(name).name}`" if local else name) if name else \
        "embedded tiny SDXL (mm_subspace.tiny_models.tiny_sdxl_path())"
    loss = history.last("loss")
    summary = {
        "base model": base,
        "instance prompt": f"`{args.instance_prompt}`",
        "steps": steps,
        "batch (per process × processes × accumulation)": f"{args.train_batch_size} × {world} × "
                                                          f"{args.gradient_accumulation_steps} = {total_batch}",
        "final loss": f"{loss:.5f}" if loss is not None else "n/a (no step run)",
        "final aux loss": f"{history.last('aux_loss'):.5g}" if history.rows else "n/a",
        "recipe": args.recipe or "none",
        "diffusers export": export_note,
        **{f"adapter on {k}": v for k, v in adapter_summary(parts).items()},
    }
    if quality is not None:
        summary["subject fidelity"] = (f"{quality['adapter_subject_fidelity']:.0%} (base {quality['base_subject_fidelity']:.0%})")
        summary["prior preservation"] = (f"{quality['adapter_prior_preservation']:.0%} "
                                         f"(base {quality['base_prior_preservation']:.0%})")
    images = {}
    if grid is not None:
        top = " (top: step 0 = base, bottom: final step)" if grid.name.startswith("step-0-vs") else ""
        images[f"Validation: `{args.validation_prompt}`{top}"] = grid.relative_to(output_dir).as_posix()
    images["Loss curve"] = curve.relative_to(output_dir).as_posix()
    repo = hub_repo_id(args)
    folder = (f'from huggingface_hub import snapshot_download\n\nfolder = snapshot_download("{repo}")  # or the local '
              f'output folder\n')
    load_ours = "\n".join(f'mms.load_adapter(pipe.{p}, f"{{folder}}/{p}")' for p in parts)
    if args.pretrained_model_name_or_path:
        make_pipe = ("from diffusers import StableDiffusionXLPipeline\n\n"
                     f'pipe = StableDiffusionXLPipeline.from_pretrained("{_public(args.pretrained_model_name_or_path)}")\n')
    else:
        make_pipe = "from mm_subspace.tiny_models import tiny_sdxl_pipeline\n\npipe = tiny_sdxl_pipeline()\n"
    usage = (f"```python\nimport mm_subspace as mms\n{folder}{make_pipe}{load_ours}\n"
             f"image = pipe({args.validation_prompt!r}).images[0]\n```\n")
    if export_note.startswith("`pytorch"):
        usage += (f"\nStock diffusers, no mm_subspace needed:\n\n```python\npipe.load_lora_weights("
                  f'"{repo}")\n```\n')
    usage += f"\nTrigger: use `{args.instance_prompt}` in the prompt.\n"
    final_grid = output_dir / "validation" / f"step-{steps:06d}.png"  # the last step alone (grid may stack step 0 above it)
    shown = final_grid if final_grid.is_file() else grid
    widget = [{"text": args.validation_prompt, "output": {"url": shown.relative_to(output_dir).as_posix()}}] if shown else None
    write_model_card(
        output_dir, title=f"DreamBooth SDXL — {args.adapter}", base_model=hub_base, method=args.adapter, summary=summary,
        flags=public_flags(args), images=images, sections={"Use it": usage, **({"Quality": _quality_section(quality)} if quality else {})},
        tags=("dreambooth", "sdxl", "text-to-image", "diffusers", "diffusers-training", "dora" if args.adapter == "dora"
              else "lora", "template:sd-lora", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
        front_matter={"license": "apache-2.0" if name is None else "openrail++", "instance_prompt": args.instance_prompt,
                      "widget": widget},
    )


def _quality_section(q: dict[str, Any]) -> str:
    reads = ", ".join(f"{k}: {v:.0%}" for k, v in q["adapter_reads_for_instance_prompt"].items())
    return (
        "Measured after training with `mm_subspace.eval.digits` (a digit classifier, test accuracy "
        f"{q['classifier_test_accuracy']:.1%}, reads each generated image downsampled to 8x8).\n\n"
        "| metric | this adapter | base |\n|---|---|---|\n"
        f"| subject fidelity: `{q['instance_prompt']}` read as {q['subject_digit']} ({q['fidelity_images']} images) | "
        f"{q['adapter_subject_fidelity']:.0%} | {q['base_subject_fidelity']:.0%} |\n"
        f"| prior preservation: prompt accuracy on the other digits 0-8 ({q['prior_images']} images) | "
        f"{q['adapter_prior_preservation']:.0%} | {q['base_prior_preservation']:.0%} |\n\n"
        f"Digits read for the instance prompt with the adapter: {reads}. Sampler: "
        f"{q['sampler']['num_inference_steps']} Euler steps, guidance {q['sampler']['guidance_scale']}, "
        f"{q['sampler']['height']} px, seed {q.get('seed', 'as --seed')}.\n"
    )


if __name__ == "__main__":
    main(parse_args())
