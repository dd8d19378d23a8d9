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
  ``checkpoint-<N>/`` written atomically (diffusers' layout).
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
from mm_subspace.atomic import atomic_write_text
from mm_subspace.caption_data import list_images
from mm_subspace.compat import enable_activation_checkpointing
from mm_subspace.distributed import (
    SkippedSteps,
    apply_test_overrides,
    check_setup,
    log_sharding,
    process_group_kwargs,
    replicate_trainable,
    sync_replicated_grads,
)
from mm_subspace.errors import ConfigError, MergeError
from mm_subspace.eval import digits as digits_eval
from mm_subspace.hub import resolve_model
from mm_subspace.presets import parse_targets
from mm_subspace.training import dreambooth_report as report
from mm_subspace.training.dreambooth_checks import (
    check_resolution,
    has_edm_scheduler,
    model_resolution,
    refuse_bad_combinations,
    set_up_process,
)
from mm_subspace.training.dreambooth_data import MicroBatches, instance_records, schedule
from mm_subspace.training.dreambooth_flags import (
    DEFAULT_INSTANCE_PROMPT,
    DIGIT_B_ONLY_LEARNING_RATE,
    DIGIT_DEFAULTS,
    EMBEDDED_LEARNING_RATE,
    EMBEDDED_MAX_STEPS,
    REAL_MAX_STEPS,
    build_parser,
)
from mm_subspace.training.optimizers import make_optimizer
from mm_subspace.training.script_flags import check_unit_interval
from mm_subspace.training.sdxl_diffusion import (
    chunked_calls,
    diffusion_loss,
    draw_noise,
    edm_denoised,
    edm_inputs,
    encode_latents,
    encode_prompt,
    generate_class_images,
    tokenize,
    validation_images,
)
from mm_subspace.training.validation_prompts import ValidationPrompt, read_validation_prompts
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
    resume_mixed_precision,
    save_image_grid,
    save_loss_curve,
    save_parts,
    step_generator,
    unwrap,
)

logger = logging.getLogger("dreambooth_sdxl")

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2")


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
                     "num_class_images", "sample_batch_size", "validation_inference_steps", "validation_batch_size",
                     "ddp_timeout", "max_skipped_steps", "class_inference_steps",
                     "text_encoder_lr", "repeats", "num_train_epochs", "validation_epochs", "threads"])
    check_positive(args, ["num_validation_images", "prior_loss_weight", "lr_warmup_steps", "max_grad_norm", "noise_offset",
                     "dataloader_num_workers", "adam_weight_decay", "adam_weight_decay_text_encoder", "alpha",
                     "lora_dropout", "lr_power"], allow_zero=True)
    check_positive(args, ["adam_epsilon"])
    check_unit_interval(args)
    if args.resolution is not None:
        check_resolution(args.resolution)  # the VAE and UNet factors are checked once the model's config is read
    refuse_bad_combinations(args, adapter_cls)

    own_data = args.instance_data_dir is not None or args.dataset_name is not None
    if args.default_subject is not None and own_data:
        raise ConfigError("--default_subject picks the embedded subject written when no data is given; it does not apply "
                          "with --instance_data_dir or --dataset_name: drop it")
    if args.default_subject is None and not own_data:
        args.default_subject = "digit" if args.pretrained_model_name_or_path is None else "cat"
    digit_default = args.default_subject == "digit" and not own_data
    if args.with_prior_preservation is None:  # on for the digit subject (before the class-prompt check)
        args.with_prior_preservation = digit_default
    if args.with_prior_preservation and args.class_prompt is None and digit_default:
        args.class_prompt = digits_eval.CLASS_PROMPT
    if digit_default:
        for key, value in DIGIT_DEFAULTS.items():
            if key not in explicit and key not in from_recipe:  # the user's flags and a recipe win
                setattr(args, key, value)
    if args.alpha is None:
        args.alpha = float(args.rank)
    if args.with_prior_preservation:
        if args.class_prompt is None:
            raise ValueError("--with_prior_preservation needs --class_prompt (e.g. --class_prompt 'a photo of a cat')")
    else:
        if args.class_data_dir is not None:
            warnings.warn("--class_data_dir is ignored without --with_prior_preservation", stacklevel=2)
        if args.class_prompt is not None:
            warnings.warn("--class_prompt is ignored without --with_prior_preservation", stacklevel=2)

    args.embedded_model = args.pretrained_model_name_or_path is None
    if args.instance_prompt is None:
        args.instance_prompt = digits_eval.INSTANCE_PROMPT if digit_default else DEFAULT_INSTANCE_PROMPT
    if args.learning_rate is None:
        args.learning_rate = EMBEDDED_LEARNING_RATE if args.embedded_model else 1e-4
        if digit_default and args.embedded_model and adapter_config(args, "unet").frozen_factor == "A":
            args.learning_rate = DIGIT_B_ONLY_LEARNING_RATE  # only B trains (AsyLoRA, SuLoRA): docs/methods.md
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
    if args.validation_prompts_file is not None:
        read_validation_prompts(args.validation_prompts_file)  # every line checked before anything runs
    return args


# --------------------------------------------------------------------------------------------- data
def adapter_config(args: argparse.Namespace, targets: str | list[str]) -> mm_subspace.AdapterConfig:
    """``config_for(args.adapter, ...)`` with the method-specific flags its config has."""
    kwargs: dict[str, Any] = dict(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=targets)
    kwargs.update(method_flag_values(args))
    return mm_subspace.config_for(args.adapter, **kwargs)


# --------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns ``{"output_dir", "global_step", "final_loss", "final_aux_loss", "digest", "exported",
    "resumed_from"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
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
    resuming = CheckpointManager(output_dir, args.adapter).resolve(args.resume_from_checkpoint)
    args.mixed_precision = resume_mixed_precision(resuming, args.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),  # as diffusers: TE1 pooled is unused
                         process_group_kwargs(args.ddp_timeout)],
    )
    apply_test_overrides(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("%s", accelerator.state)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_up_process(args, accelerator)  # --local_rank agrees, CPU threads, TF32, xformers present
    set_seed(args.seed)

    # -- 1. everything that can be wrong with the input is checked before any model loads ----------
    # a local folder must hold the model, a hub id must be fetchable: one HubError, no retries and tracebacks
    if args.pretrained_model_name_or_path:
        resolve_model(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", "model_index.json")
    if args.pretrained_vae_model_name_or_path:
        resolve_model(args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path", "config.json")
    model_path = args.pretrained_model_name_or_path or str(tiny_models.tiny_sdxl_path())
    vae_path = args.pretrained_vae_model_name_or_path or model_path
    vae_sub = None if args.pretrained_vae_model_name_or_path else "vae"
    resolution = model_resolution(args, model_path, vae_path, vae_sub)  # from the configs; args.resolution set
    edm_scheduler = has_edm_scheduler(args, model_path)
    edm = edm_scheduler or args.do_edm_style_training
    config_unet = adapter_config(args, parse_targets(args.target_preset))  # ConfigError on bad values
    config_text = adapter_config(args, parse_targets(args.text_encoder_target_preset)) if args.train_text_encoder else None
    part_names = ["unet", *(TEXT_ENCODER_PARTS if args.train_text_encoder else ())]
    # DeepSpeed, FSDP1, FSDP2 with the text encoders: refused here. Sharded (FSDP2): forwards need every rank
    sharded = check_setup(accelerator, len(part_names)) == "fsdp2"

    manager = CheckpointManager(output_dir, args.adapter, args.checkpoints_total_limit, num_processes=world)
    # the whole checkpoint is checked now (files, method, adapter settings); a broken "latest" falls back
    resume_path, resume_state = manager.find_resumable(
        args.resume_from_checkpoint, part_names, {p: config_unet if p == "unet" else config_text for p in part_names})
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", manager.root)
    resume_step = resume_state["step"] if resume_state else 0

    instance = instance_records(args, output_dir, resolution, accelerator)
    logger.info("%d instance images, %d with their own caption", len(instance), sum(r.caption is not None for r in instance))

    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir)
        generate_class_images(args, model_path, class_dir, resolution, accelerator)  # split across the ranks
        classes = list_images(class_dir, "class", "--class_data_dir",
                              allow_outside=args.allow_outside_data)[: args.num_class_images]
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

    cached: dict[str, torch.Tensor] = {}
    if args.cache_latents:  # one VAE sample per entry (each repeat keeps its own epoch-0 crop)
        for key, pixels in data.cache_pixels().items():
            cached[key] = torch.cat([encode_latents(vae, weight_dtype, chunk, step_generator(args.seed, 0xCAC4E, i, len(cached)))
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
    manager.history = history  # saved as JSON in trainer_state.json (never pickled)
    skips = SkippedSteps(accelerator, args.max_skipped_steps)  # fp16: steps the loss scaler skips are not divergence
    manager.skipped = skips  # its counts too, so a resumed run keeps them
    trained = list(parts)
    replicate_trainable(accelerator, [parts[n] for n in trained])  # FSDP2: the frozen base is sharded, adapters whole
    prepared = accelerator.prepare(*[parts[n] for n in trained], optimizer, lr_scheduler)
    wrapped = dict(zip(trained, prepared[: len(trained)]))
    optimizer, lr_scheduler = prepared[len(trained):]
    unet_w = wrapped["unet"]
    text_models = [wrapped.get("text_encoder", text_encoder), wrapped.get("text_encoder_2", text_encoder_2)]
    trainable = [p for n in trained for _, p in parts[n].named_parameters() if p.requires_grad]
    log_sharding(accelerator, [parts[n] for n in trained])

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
        manager.load(accelerator, resume_path)  # runs no code from the folder
        manager.restore(resume_state)
        global_step = resume_step

    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info("***** training: %d instance images, %d steps (%d epochs), batch %d per process x %d processes x %d "
                "accumulation = %d, %s optimizer%s", len(instance), args.max_train_steps, args.num_train_epochs,
                args.train_batch_size, world, args.gradient_accumulation_steps, total_batch,
                type(getattr(optimizer, "optimizer", optimizer)).__name__, ", EDM-style" if edm else "")

    # -- 7. one micro-step: every random draw from step_generator(seed, rank, micro_step) -------------
    def micro_batch(micro_step: int, item: dict[str, torch.Tensor]) -> dict[str, Any]:
        gen = step_generator(args.seed, rank, micro_step)
        if args.cache_latents:
            latents = torch.cat([cached["instance"][item["entries"]],
                                 *([cached["class"][item["class_entries"]]] if args.with_prior_preservation else [])])
            latents = latents.to(device, dtype=weight_dtype)
        else:
            latents = encode_latents(vae, weight_dtype, item["pixels"], gen)
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

    validated: set[int] = set()  # steps with a grid (the same on every rank)
    prompt_lines = read_validation_prompts(args.validation_prompts_file) if args.validation_prompts_file else None

    def log_validation(step: int) -> Path | None:
        """The validation grid of ``step``: rank 0 writes it; every rank runs it when the UNet is sharded."""
        if args.num_validation_images == 0:
            return None
        validated.add(step)
        pipe, models = current_pipeline()
        if prompt_lines is None:
            calls = chunked_calls(args.validation_prompt, args.num_validation_images, args.validation_batch_size,
                                  args.seed, height=resolution, width=resolution,
                                  num_inference_steps=args.validation_inference_steps)
        else:
            calls = [validation_call(line, i) for i, line in enumerate(prompt_lines)]
        images = validation_images(pipe, calls, weight_dtype, progress=accelerator.is_local_main_process)
        for name, m in models.items():
            m.train(name in parts)
        if not accelerator.is_main_process:
            return None
        cols = len(images) if prompt_lines is None else min(len(images), 4)
        path = save_image_grid(images, output_dir / "validation" / f"step-{step:06d}.png", cols=cols)
        report.log_images(accelerator, images, step, args.validation_prompt if prompt_lines is None else
                   " | ".join(line.prompt for line in prompt_lines))
        logger.info("validation grid %s", path)
        return path

    def validation_call(line: ValidationPrompt, index: int) -> dict[str, Any]:
        """The pipeline call of a --validation_prompts_file line; what the line leaves out takes the script's values."""
        extra = {} if line.guidance_scale is None else {"guidance_scale": line.guidance_scale}
        seed = args.seed + index if line.seed is None else line.seed
        return {"prompt": line.prompt, "negative_prompt": line.negative_prompt,
                "generator": torch.Generator().manual_seed(seed), "height": line.height or resolution,
                "width": line.width or resolution,
                "num_inference_steps": line.num_inference_steps or args.validation_inference_steps, **extra}

    # -- 9. train (a step-0 grid first: the base, as every method starts at ΔW = 0) ----------------------
    first_grid = None
    validating = accelerator.is_main_process or sharded  # a sharded UNet runs on every rank
    if global_step == 0 and validating:
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
                if not skips.scaling:
                    check_finite({"loss": terms[0].item(), "aux_loss": terms[1].item()}, global_step + 1,
                                 lambda batch=batch: where_nonfinite(batch), manager.last_saved)
                sums += terms / args.gradient_accumulation_steps
                accelerator.backward(loss + aux)
                for n in trained:  # drop aux terms re-recorded by gradient-checkpointing recomputation
                    mm_subspace.aux_loss(parts[n])
                if accelerator.sync_gradients:
                    sync_replicated_grads(accelerator, trainable)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    if not skips.scaling:
                        check_finite({"grad_norm": float(grad_norm)}, global_step + 1, lambda batch=batch: where_nonfinite(batch),
                                     manager.last_saved)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    skips.update(global_step + 1, manager.last_saved)
        if not accelerator.sync_gradients:  # cannot happen: micro steps are a multiple of accumulation
            raise RuntimeError("gradient accumulation out of step with accelerate")
        global_step += 1
        logs = {"loss": sums[0].item(), "aux_loss": sums[1].item(), "lr": lr_scheduler.get_last_lr()[0]}
        history.append(global_step, **logs)
        if skips.scaling:  # progress bar and trackers (not a loss series of the curve)
            logs["skipped_steps"] = skips.total
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", aux=f"{logs['aux_loss']:.3g}", lr=f"{logs['lr']:.2e}",
                             **({"skipped": skips.total} if skips.scaling else {}))
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            manager.save(accelerator, global_step)
        if args.validation_steps and global_step % args.validation_steps == 0:
            if validating:
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
            export_note += report.kohya_export(output_dir / KOHYA_WEIGHTS, final)
    quality = None
    if validating:  # rank 0, or every rank when the UNet is sharded
        if args.num_validation_images and global_step not in validated:
            last_grid = log_validation(global_step)
        if args.eval_subject_digit is not None:
            quality = report.digit_quality(args, current_pipeline()[0], resolution)
            for name, m in zip(("unet", "text_encoder", "text_encoder_2"), (unet, text_encoder, text_encoder_2)):
                m.train(name in parts)
    if accelerator.is_main_process:
        start_grid = first_grid or output_dir / "validation" / f"step-{0:06d}.png"
        if last_grid is not None and start_grid.is_file() and start_grid != last_grid:
            last_grid = report.stack_grids([start_grid, last_grid], output_dir / "validation" / f"step-0-vs-{global_step}.png")
        if quality is not None:
            accelerator.log({f"quality/{k}": v for k, v in quality.items() if isinstance(v, float)}, step=global_step)
            atomic_write_text(output_dir / "quality.json", json.dumps(quality, indent=2) + "\n")
        curve = save_loss_curve(history, output_dir / "loss_curve.png", f"DreamBooth SDXL, {args.adapter}")
        atomic_write_text(output_dir / "training_args.json", json.dumps(report.public_flags(args), indent=2, default=str) + "\n")
        report.model_card(args, output_dir, history, global_step, total_batch, world, export_note, last_grid, curve, final,
                    quality, captions=(sum(r.caption is not None for r in instance), len(instance)))
        logger.info("saved %s adapter to %s", args.adapter, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    hub = report.push_to_hub(args, output_dir) if args.push_to_hub and accelerator.is_main_process else None
    return {"output_dir": output_dir, "global_step": global_step, "final_loss": history.last("loss"),
            "quality": quality if accelerator.is_main_process else None, "seconds_per_step": seconds_per_step,
            "final_aux_loss": history.last("aux_loss"), "digest": digest, "exported": exported, "resumed_from": resume_path,
            "edm": edm, "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__, "hub": hub,
            "prompts": prompts, "skipped_steps": skips.total, **steps}


if __name__ == "__main__":
    from mm_subspace.cli import report_errors

    raise SystemExit(report_errors("dreambooth_sdxl.py", lambda: main(parse_args())))
