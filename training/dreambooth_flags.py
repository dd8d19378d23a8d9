"""The DreamBooth script's command line (``training/dreambooth_sdxl.py``): its defaults and every flag, grouped as
in diffusers' ``train_dreambooth_lora_sdxl.py``; the flags both training scripts share come from
:mod:`~mm_subspace.training.script_flags`. ``docs/dreambooth.md``'s flag tables are generated from this parser."""

from __future__ import annotations

import argparse
from typing import Any

import mm_subspace
from mm_subspace.training.dreambooth_data import DIGIT_SUBJECT_IMAGES
from mm_subspace.training.script_flags import add_flags, finite_float, str_to_bool

DEFAULT_INSTANCE_PROMPT = "a photo of sks cat"  # --default_subject cat, or an --instance_data_dir
EMBEDDED_MAX_STEPS = 500  # embedded default: under two minutes on 2 free CPU cores (32 px, batch 2 + 2 class images)
EMBEDDED_LEARNING_RATE = 2e-3  # the tiny model learns the new digit in a few hundred steps (1e-4 does not move it)
#: defaults of the digit subject (flags given explicitly win), chosen by benchmarks/dreambooth_quality.py and the probes
#: of docs/dreambooth.md ("The embedded default: how it was chosen"): adapters on both text encoders keep the other
#: digits, and at lr 2e-3 they bind "sks" to the 9 on the seeds where the UNet alone learned it slowly; rank 6 with 50
#: warm-up steps before the cosine decay, at prior weight 1.5, learns the 9
DIGIT_DEFAULTS: dict[str, Any] = {"train_batch_size": 2, "num_class_images": 50, "sample_batch_size": 25,
                                  "class_inference_steps": 20, "target_preset": "sdxl_unet_wide", "rank": 6,
                                  "lr_scheduler": "cosine", "lr_warmup_steps": 50, "prior_loss_weight": 1.5,
                                  "train_text_encoder": True, "text_encoder_lr": 2e-3}
#: the digit subject's learning rate for adapters that train only B (AsyLoRA with its A frozen, SuLoRA): one factor
#: moves ΔW instead of two, and at 2e-3 AsyLoRA learned the 9 in 28 % of images (6e-3: 73 %; docs/methods.md)
DIGIT_B_ONLY_LEARNING_RATE = 6e-3
REAL_MAX_STEPS = 500  # the MoSLoRA paper's step count
EMBEDDED_RESOLUTION = 32  # the shipped digits SDXL: UNet sample_size 8 x VAE factor 4 (tested against its config)

#: ``--recipe`` names: the SDXL recipes of mm_subspace.recipes (``moslora_paper`` = ``moslora_sdxl``, kept as an alias)
RECIPES = (*mm_subspace.recipes.list_recipes("sdxl"), *sorted(mm_subspace.recipes.ALIASES))


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
              "--router_temperature", "--balance_coef",
              rank={"help": "Rank r of the adapter's low-rank factors (the embedded digit subject defaults to 6)."})
    g.add_argument("--target_preset", type=str, default="sdxl_unet",
                   help="UNet modules to adapt: a preset name (mm_subspace.list_presets()) or comma-separated module names/suffixes. "
                   "The digit subject defaults to sdxl_unet_wide (attention + feed-forward + time embeddings): with attention "
                   "only, the tiny UNet learns the 9 but loses the other digits.")
    g.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=False,
                   help="Also put adapters on both text encoders (targets: --text_encoder_target_preset). On by default for the "
                   "embedded digit subject (with --text_encoder_lr 2e-3; --no-train_text_encoder turns it off).")
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
                   help="Prompt with the identifier of the subject (the caption of every image that has none). Default: 'a handwritten "
                        "digit sks' for the digit subject, "
                   f"{DEFAULT_INSTANCE_PROMPT!r} otherwise.")
    g.add_argument("--caption_column", type=str, default=None,
                   help="Caption column of metadata.jsonl/metadata.csv in --instance_data_dir (default: the first of "
                   "text, caption, prompt it has) or of --dataset_name (default: none, every image gets --instance_prompt). "
                   "<image>.txt sidecar files are read too; see docs/dreambooth.md for the precedence rules.")
    g.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Instead of --instance_data_dir: a datasets data set (a folder saved with save_to_disk, a local "
                   "data folder, or a hub id). Needs the `datasets` library (extra: train).")
    g.add_argument("--allow_outside_data", action="store_true",
                   help="Accept images named by metadata.jsonl/metadata.csv (and symlinks) that resolve outside "
                   "--instance_data_dir / --class_data_dir (data kept elsewhere on purpose). Default: refused.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name, if it has several.")
    g.add_argument("--cache_dir", type=str, default=None, help="Cache folder of downloaded data sets.")
    g.add_argument("--repeats", type=int, default=1, help="How many times each instance image is repeated per epoch.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training image size (square). Default: the model's native size (UNet sample_size × VAE factor: "
                   f"{EMBEDDED_RESOLUTION} for the embedded model, 1024 for SDXL). Must be divisible by the VAE factor; a "
                   "size far from the native one gets a warning (the model was not trained there, and every step and "
                   "validation image costs resolution² more).")
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
    g.add_argument("--prior_loss_weight", type=finite_float, default=1.0, help="Weight of the prior-preservation loss.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    g.add_argument("--class_inference_steps", type=int, default=25, help="Denoising steps per generated class image.")
    g.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="Precision of the pipeline that generates class images. Default: fp16 on a GPU, fp32 otherwise.")

    g = parser.add_argument_group("training")
    add_flags(g, "--recipe", "--train_batch_size", "--gradient_accumulation_steps", "--max_train_steps",
              "--num_train_epochs", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
              "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon",
              "--max_grad_norm", "--mixed_precision", "--gradient_checkpointing", "--threads", "--seed",
              "--max_skipped_steps", "--ddp_timeout",
              recipe={"choices": RECIPES, "help": 'Paper setting from mm_subspace.recipes: moslora_sdxl (alias moslora_paper) = MoSLoRA '
                                                  '§4.3 / the official script: rank 4, orthogonal mixer, lr 1e-4 constant, batch 1 x '
                                                  'accumulation 4, 500 steps, 50 validation inference steps, no prior preservation, no '
                                                  'text-encoder training; lora_sdxl = the same with LoRA. Flags given explicitly win.'},
              max_train_steps={"help": 'Optimizer steps; wins over --num_train_epochs. Default: from --num_train_epochs when given, '
                                       f'else {EMBEDDED_MAX_STEPS} on the embedded model, {REAL_MAX_STEPS} otherwise.'},
              num_train_epochs={"help": 'Passes over the data (instance images × --repeats; with prior preservation, at least the class '
                                        'images), converted to steps as diffusers does; the arithmetic is logged.'},
              learning_rate={"default": None, "help": f'Learning rate of the adapter parameters. Default: {EMBEDDED_LEARNING_RATE:g} on '
                                                      'the embedded model, 1e-4 otherwise.'},
              adam_weight_decay={"default": 0.0001, "help": 'AdamW weight decay of the UNet adapters.'},
              gradient_checkpointing={"help": 'Trade compute for memory in the UNet (and text encoders).'})
    g.add_argument("--text_encoder_lr", type=finite_float, default=5e-6,
                   help="Learning rate of text-encoder adapters (as diffusers; with --optimizer prodigy it is --learning_rate).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply --learning_rate (not --text_encoder_lr, as diffusers) by accumulation × batch size × processes.")
    g.add_argument("--optimizer", type=str.lower, default="adamw", choices=["adamw", "prodigy"],
                   help="AdamW (torch, or bitsandbytes' 8-bit with --use_8bit_adam) or Prodigy (prodigyopt, extra: train; "
                   "use --learning_rate 1.0).")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (extra: quant). AdamW only.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=finite_float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--adam_weight_decay_text_encoder", type=finite_float, default=1e-3, help="AdamW weight decay of text-encoder adapters.")
    g.add_argument("--prodigy_beta3", type=finite_float, default=None,
                   help="Prodigy's step-size running-average coefficient. Default: sqrt(beta2).")
    g.add_argument("--prodigy_decouple", type=str_to_bool, default=True, help="Prodigy: AdamW-style decoupled weight decay (true/false).")
    g.add_argument("--prodigy_use_bias_correction", type=str_to_bool, default=True, help="Prodigy: Adam's bias correction (true/false).")
    g.add_argument("--prodigy_safeguard_warmup", type=str_to_bool, default=True,
                   help="Prodigy: leave lr out of the D estimate's denominator during warm-up (true/false).")
    g.add_argument("--snr_gamma", type=finite_float, default=None,
                   help="Min-SNR weighting gamma (Hang et al. 2023, §3.4); 5.0 is recommended. Default: plain MSE.")
    g.add_argument("--noise_offset", type=finite_float, default=0.0, help="Noise offset (per-channel constant added to the noise).")
    g.add_argument("--do_edm_style_training", action="store_true",
                   help="EDM-style training (Karras et al. 2022): sigmas from an Euler scheduler, preconditioned inputs and "
                   "outputs, x0 target. Switched on automatically for a model whose scheduler is an EDM one "
                   "(e.g. Playground v2.5).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU).")

    g = parser.add_argument_group("checkpoints")
    add_flags(g, "--output_dir", "--checkpointing_steps", "--checkpoints_total_limit",
              "--resume_from_checkpoint",
              output_dir={"help": "Output folder. Default: runs/dreambooth-sdxl-<adapter> (the comparison app scans runs/)."},
              checkpointing_steps={"help": 'Save a resumable checkpoint (<output_dir>/checkpoint-<step>, as diffusers) every N '
                                           'optimizer steps. Default: 500, or half of --max_train_steps when that is less (the embedded '
                                           'default saves at 250 and 500).'})
    g.add_argument("--output_kohya_format", action="store_true",
                   help="Also write pytorch_lora_weights_kohya.safetensors (kohya / A1111 / ComfyUI keys, mixer folded, true alpha).")

    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Upload the output folder (without checkpoints and the photos) to the Hub at the end. Offline, "
                   "the run ends normally and prints the exact upload command.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (user/name). Default: the output folder's name.")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token. Default: the one saved by `hf auth login`.")

    g = parser.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", type=str, default=None,
                   help="Prompt of the validation images. Default: --instance_prompt (diffusers skips validation when it is "
                   "unset; here a final validation grid is always written unless --num_validation_images 0).")
    g.add_argument("--validation_prompts_file", type=str, default=None,
                   help="Validate on the prompts of this file instead of --validation_prompt: one per line, one image each, "
                   "with kohya's sample-prompt options (--n negative prompt, --d seed, --s steps, --l guidance, --w/--h "
                   "size; e.g. 'a photo of sks dog on a beach --n blurry --d 3 --s 30'); # comments and blank lines skipped.")
    g.add_argument("--num_validation_images", type=int, default=4,
                   help="Images per validation grid (0 disables validation). With --validation_prompts_file: one per line.")
    g.add_argument("--validation_steps", type=int, default=None,
                   help="Validate every N steps (a grid validation/step-<N>.png each time). A final validation always runs.")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Validate every N epochs (converted to steps; the arithmetic is logged). Not with --validation_steps.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps of validation images.")
    g.add_argument("--validation_batch_size", type=int, default=4,
                   help="Validation images per pipeline call (the images do not depend on it; lower it to save memory).")
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
