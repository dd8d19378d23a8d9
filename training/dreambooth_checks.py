"""Checks of the DreamBooth script's flags that need more than argparse: image sizes the SDXL pipeline and the
model can take, a warning for sizes far from the model's native one, and flag combinations that cannot work."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from mm_subspace.errors import ConfigError
from mm_subspace.training.script_flags import cpu_threads
from mm_subspace.training_utils import is_dora

logger = logging.getLogger("dreambooth_sdxl")

#: ``--resolution`` more than this factor above or below the model's native size gets a warning
RESOLUTION_WARN_FACTOR = 2


#: SDXL pipelines generate only sizes divisible by 8 (their own check), whatever the VAE
PIPELINE_SIZE_FACTOR = 8


def _multiple_hint(value: int, factor: int) -> str:
    below = max(factor, value - value % factor)
    return f"use {below}" + (f" or {below + factor}" if below < value else "")


def check_resolution(resolution: int, vae_factor: int = 1, unet_factor: int = 1, vae_path: str = "") -> None:
    """``--resolution`` must be a multiple of the VAE factor and of 8 (the SDXL pipeline's validation and class
    images), and give a latent at least as large as the UNet's downsampling (``2**(down blocks - 1)``): checked
    before training (the parse-time part without a model), so a bad size never trains and then fails in the final
    validation or evaluation."""
    factor = math.lcm(vae_factor, PIPELINE_SIZE_FACTOR)
    if resolution % factor:
        of = f"the VAE factor {vae_factor} of {vae_path} and " if factor != PIPELINE_SIZE_FACTOR else ""
        raise ConfigError(f"--resolution {resolution} is not divisible by {of}{PIPELINE_SIZE_FACTOR} (SDXL pipelines "
                          f"generate sizes divisible by {PIPELINE_SIZE_FACTOR}): {_multiple_hint(resolution, factor)}")
    smallest = math.lcm(factor, vae_factor * unet_factor)
    if resolution < smallest:
        raise ConfigError(f"--resolution {resolution} is too small for this model: its VAE (factor {vae_factor}) and "
                          f"UNet ({unet_factor}x downsampling) need at least {smallest} px")


def resolution_warning(resolution: int, native: int, model: str) -> str | None:
    """A warning when ``--resolution`` is more than :data:`RESOLUTION_WARN_FACTOR` times above or below the model's
    native size (``None`` when it is close): a size the model never saw trains a different task, and each step and
    validation image costs (resolution / native)² as much (diffusers' ``--resolution=1024`` on the 32 px embedded
    model: 1,024x the pixels)."""
    if native / RESOLUTION_WARN_FACTOR <= resolution <= native * RESOLUTION_WARN_FACTOR:
        return None
    ratio = (resolution / native) ** 2
    cost = f"{ratio:,.0f}" if ratio >= 1 else f"{ratio:.2g}"
    return (f"--resolution {resolution} is far from the native size {native} px of {model} (UNet sample_size × VAE "
            f"factor): the model was trained at {native} px, and every training step and validation image costs about "
            f"{cost}x the pixels of one at {native} px. Use --resolution {native} (or leave it out) unless you "
            "mean to fine-tune to another size")


def refuse_bad_combinations(args: argparse.Namespace, adapter_cls: Any) -> None:
    """Flags that cannot work together (or at all here) raise before anything runs, naming the fix."""
    if args.train_text_encoder_ti:
        raise ConfigError(
            "--train_text_encoder_ti (pivotal tuning: new token embeddings, diffusers' advanced script) is not supported: "
            "this script trains adapters only. Use --train_text_encoder to adapt both text encoders; see docs/dreambooth.md"
        )
    if args.dataset_name and args.instance_data_dir:
        raise ValueError("pass one of --dataset_name and --instance_data_dir, not both")
    if args.instance_data_dir is not None and not Path(args.instance_data_dir).expanduser().is_dir():
        raise ConfigError(f"--instance_data_dir {args.instance_data_dir}: no such folder; pass the folder of the "
                          "subject's images (or leave the flag out for the embedded default subject)")
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


def set_up_process(args: argparse.Namespace, accelerator: Any) -> None:
    """Per-process settings checked once accelerate knows the process: ``--local_rank`` must agree with it, CPU
    threads (``--threads``, split among the processes of this machine), TF32 on CUDA, xformers installed if asked."""
    if args.local_rank not in (-1, accelerator.local_process_index):  # torch.distributed.launch's flag: must agree
        raise ConfigError(f"--local_rank {args.local_rank} but accelerate runs this process as local rank "
                          f"{accelerator.local_process_index}; drop --local_rank (accelerate launch sets the rank)")
    if accelerator.device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        args.threads = cpu_threads(args.threads, local_world)
        torch.set_num_threads(args.threads)
        logger.info("CPU: %d torch thread(s) per process (--threads)", args.threads)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ConfigError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); without it "
                          "PyTorch's SDPA attention runs, already memory-efficient: drop the flag")


def model_resolution(args: argparse.Namespace, model_path: str, vae_path: str, vae_sub: str | None) -> int:
    """The training size: ``--resolution`` or the model's native size (UNet ``sample_size`` × VAE factor), read from
    the config files only (no weights load), warned about when far from native and checked against the VAE and UNet
    factors; recorded in ``args.resolution`` (training_args.json and the card)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg = UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=args.revision)
    vae_cfg = AutoencoderKL.load_config(vae_path, subfolder=vae_sub, revision=args.revision)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    native = int(unet_cfg["sample_size"]) * vae_factor
    resolution = args.resolution or native
    warning = resolution_warning(resolution, native, "the embedded model" if args.embedded_model else model_path)
    if warning:
        logger.warning("%s", warning)
    check_resolution(resolution, vae_factor, 2 ** (len(unet_cfg["down_block_types"]) - 1), vae_path)
    args.resolution = resolution
    return resolution


def has_edm_scheduler(args: argparse.Namespace, model_path: str) -> bool:
    """Whether the model ships an EDM scheduler (then EDM-style training is on by itself, as in diffusers'
    script); ``--snr_gamma`` is refused with it (Min-SNR weighting is defined for DDPM timesteps)."""
    from diffusers import DDPMScheduler

    scheduler_class = DDPMScheduler.load_config(model_path, subfolder="scheduler", revision=args.revision)["_class_name"]
    edm_scheduler = "EDM" in scheduler_class
    if edm_scheduler and not args.do_edm_style_training:
        if args.snr_gamma is not None:
            raise ValueError(f"{model_path} has an EDM scheduler ({scheduler_class}): EDM-style training is used, and "
                             "--snr_gamma is not defined for it; drop --snr_gamma")
        logger.info("%s has an EDM scheduler (%s): EDM-style training switched on", model_path, scheduler_class)
    return edm_scheduler
