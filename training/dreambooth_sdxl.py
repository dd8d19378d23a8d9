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
import importlib.util
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mm_subspace
from mm_subspace import tiny_models
from mm_subspace.caption_data import list_images
from mm_subspace.errors import ConfigError, MergeError
from mm_subspace.eval import digits as digits_eval
from mm_subspace.atomic import atomic_write_text
from mm_subspace.compat import enable_activation_checkpointing, require
from mm_subspace.training.dreambooth_data import DIGIT_SUBJECT_IMAGES, MicroBatches, instance_records, schedule
from mm_subspace.training.dreambooth_report import (digit_quality, log_images, model_card, public_flags, push_to_hub,
                                                    stack_grids)
from mm_subspace.training.script_flags import add_flags, str_to_bool
from mm_subspace.training.sdxl_diffusion import (diffusion_loss, draw_noise, edm_denoised, edm_inputs, encode_prompt,
                                                 generate_class_images, tokenize)
from mm_subspace.training_utils import (
    CheckpointManager,
    LossHistory,
    adapter_summary,
    assert_replicas_in_sync,
    cast_trainable_params,
    check_finite,
    check_method_flags,
    check_positive,
    is_dora,
    locate_nonfinite,
    method_flag_values,
    nonfinite_parameters,
    param_groups,
    save_image_grid,
    save_loss_curve,
    save_parts,
    step_generator,
    unwrap,
)

logger = logging.getLogger("dreambooth_sdxl")

DEFAULT_INSTANCE_PROMPT = "a photo of sks cat"  # --default_subject cat, or an --instance_data_dir
EMBEDDED_MAX_STEPS = 500  # embedded default: under two minutes on 2 free CPU cores (32 px, batch 2 + 2 class images)
EMBEDDED_LEARNING_RATE = 2e-3  # the tiny model learns the new digit in a few hundred steps (1e-4 does not move it)
#: defaults of the digit subject (flags given explicitly win): cosine decay and prior weight 1.5 hold fidelity and
#: prior preservation on every seed (benchmarks/dreambooth_quality.py; 250 constant steps at weight 1 did not)
DIGIT_DEFAULTS: dict[str, Any] = {"train_batch_size": 2, "num_class_images": 50, "sample_batch_size": 25,
                                  "class_inference_steps": 20, "target_preset": "sdxl_unet_wide",
                                  "lr_scheduler": "cosine", "prior_loss_weight": 1.5}
REAL_MAX_STEPS = 500  # the MoSLoRA paper's step count
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
    add_flags(g, "--adapter", "--rank", "--alpha", "--lora_dropout", "--mixer_init", "--num_subspaces", "--pairing", "--a_init",
              "--router_temperature")
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
    add_flags(g, "--recipe", "--train_batch_size", "--gradient_accumulation_steps", "--max_train_steps",
              "--num_train_epochs", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
              "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon",
              "--max_grad_norm", "--mixed_precision", "--gradient_checkpointing", "--seed",
              recipe={"choices": RECIPES, "help": 'Paper setting from mm_subspace.recipes: moslora_sdxl (alias moslora_paper) = MoSLoRA §4.3 / the official script: rank 4, orthogonal mixer, lr 1e-4 constant, batch 1 x accumulation 4, 500 steps, 50 validation inference steps, no prior preservation, no text-encoder training; lora_sdxl = the same with LoRA. Flags given explicitly win.'},
              max_train_steps={"help": f'Optimizer steps; wins over --num_train_epochs. Default: from --num_train_epochs when given, else {EMBEDDED_MAX_STEPS} on the embedded model, {REAL_MAX_STEPS} otherwise.'},
              num_train_epochs={"help": 'Passes over the data (instance images × --repeats; with prior preservation, at least the class images), converted to steps as diffusers does; the arithmetic is logged.'},
              learning_rate={"default": None, "help": f'Learning rate of the adapter parameters. Default: {EMBEDDED_LEARNING_RATE:g} on the embedded model, 1e-4 otherwise.'},
              adam_weight_decay={"default": 0.0001, "help": 'AdamW weight decay of the UNet adapters.'},
              gradient_checkpointing={"help": 'Trade compute for memory in the UNet (and text encoders).'})
    g.add_argument("--text_encoder_lr", type=float, default=5e-6,
                   help="Learning rate of text-encoder adapters (as diffusers; with --optimizer prodigy it is --learning_rate).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply --learning_rate (not --text_encoder_lr, as diffusers) by accumulation × batch size × processes.")
    g.add_argument("--optimizer", type=str.lower, default="adamw", choices=["adamw", "prodigy"],
                   help="AdamW (torch, or bitsandbytes' 8-bit with --use_8bit_adam) or Prodigy (prodigyopt, extra: train; "
                   "use --learning_rate 1.0).")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (extra: quant). AdamW only.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3, help="AdamW weight decay of text-encoder adapters.")
    g.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's step-size running-average coefficient. Default: sqrt(beta2).")
    g.add_argument("--prodigy_decouple", type=str_to_bool, default=True, help="Prodigy: AdamW-style decoupled weight decay (true/false).")
    g.add_argument("--prodigy_use_bias_correction", type=str_to_bool, default=True, help="Prodigy: Adam's bias correction (true/false).")
    g.add_argument("--prodigy_safeguard_warmup", type=str_to_bool, default=True,
                   help="Prodigy: leave lr out of the D estimate's denominator during warm-up (true/false).")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR weighting gamma (Hang et al. 2023, §3.4); 5.0 is recommended. Default: plain MSE.")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (per-channel constant added to the noise).")
    g.add_argument("--do_edm_style_training", action="store_true",
                   help="EDM-style training (Karras et al. 2022): sigmas from an Euler scheduler, preconditioned inputs and "
                   "outputs, x0 target. Switched on automatically for a model whose scheduler is an EDM one "
                   "(e.g. Playground v2.5).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU).")

    g = parser.add_argument_group("checkpoints")
    add_flags(g, "--output_dir", "--checkpointing_steps", "--checkpoints_total_limit",
              "--resume_from_checkpoint",
              output_dir={"help": "Output folder. Default: runs/dreambooth-sdxl-<adapter> (the comparison app scans runs/)."},
              checkpointing_steps={"help": 'Save a resumable checkpoint (training_state/checkpoint-<step>) every N optimizer steps. Default: 500, or half of --max_train_steps when that is less (the embedded default saves at 250 and 500).'})
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
    add_flags(g, "--report_to", "--logging_dir")

    g = parser.add_argument_group("diffusers compatibility")
    g.add_argument("--use_dora", action="store_true",
                   help="diffusers' spelling of DoRA: --adapter lora becomes dora, --adapter moslora becomes dora with a mixer.")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="torch.distributed.launch's flag: accepted when it agrees with the local rank accelerate runs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention in the UNet, as diffusers (needs xformers; without the flag PyTorch's "
                   "memory-efficient SDPA attention runs).")
    g.add_argument("--train_text_encoder_ti", action="store_true",
                   help="NOT SUPPORTED (pivotal tuning / textual inversion of diffusers' advanced script): refused with an "
                   "error. Use --train_text_encoder.")
    return parser


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
        if not adapter_cls.mergeable or is_dora(args.adapter):
            why = "DoRA's magnitude has no kohya slot" if is_dora(args.adapter) else adapter_cls.merge_refusal
            raise ConfigError(f"--output_kohya_format needs an adapter that folds to plain LoRA, not {args.adapter}: {why}")
    if args.use_8bit_adam and args.optimizer != "adamw":
        raise ConfigError(f"--use_8bit_adam is bitsandbytes' 8-bit AdamW; it does not apply to --optimizer {args.optimizer}: "
                          "drop one of them")
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
    kwargs: dict[str, Any] = dict(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=targets)
    kwargs.update(method_flag_values(args))
    return mm_subspace.config_for(args.adapter, **kwargs)


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


# --------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns ``{"output_dir", "global_step", "final_loss", "final_aux_loss", "digest", "exported",
    "resumed_from"}``."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        ProjectConfiguration,
        set_seed,
    )
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EDMEulerScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.optimization import get_scheduler
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
    if args.local_rank not in (-1, accelerator.local_process_index):  # torch.distributed.launch's flag: must agree
        raise ConfigError(f"--local_rank {args.local_rank} but accelerate runs this process as local rank "
                          f"{accelerator.local_process_index}; drop --local_rank (accelerate launch sets the rank)")
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ConfigError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); without it "
                          "PyTorch's SDPA attention runs, already memory-efficient: drop the flag")

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
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
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
        return {"latents": latents, "rows": item["rows"], "time_ids": item["time_ids"].to(device, dtype=weight_dtype),
                **draw_noise(noise_scheduler, latents, gen, args.noise_offset, edm)}

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
                loss = diffusion_loss(noise_scheduler, batch, pred, edm=edm, edm_scheduler=edm_scheduler,
                                      snr_gamma=args.snr_gamma, prior_loss_weight=args.prior_loss_weight
                                      if args.with_prior_preservation else None)
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
                           "scale folded into B (exact)." if is_dora(args.adapter) else
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
            last_grid = stack_grids([start_grid, last_grid], output_dir / "validation" / f"step-0-vs-{global_step}.png")
        quality = None
        if args.eval_subject_digit is not None:
            quality = digit_quality(args, current_pipeline()[0], resolution)
            for name, m in zip(("unet", "text_encoder", "text_encoder_2"), (unet, text_encoder, text_encoder_2)):
                m.train(name in parts)
            accelerator.log({f"quality/{k}": v for k, v in quality.items() if isinstance(v, float)}, step=global_step)
            atomic_write_text(output_dir / "quality.json", json.dumps(quality, indent=2) + "\n")
        curve = save_loss_curve(history, output_dir / "loss_curve.png", f"DreamBooth SDXL, {args.adapter}")
        atomic_write_text(output_dir / "training_args.json", json.dumps(public_flags(args), indent=2, default=str) + "\n")
        model_card(args, output_dir, history, global_step, total_batch, world, export_note, last_grid, curve, final,
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


if __name__ == "__main__":
    main(parse_args())
