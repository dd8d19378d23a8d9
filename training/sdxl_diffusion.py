"""Diffusion helpers of the SDXL training script: prompt encoding, class images, EDM preconditioning.

Used by :mod:`mm_subspace.training.dreambooth_sdxl` (as diffusers' ``train_dreambooth_lora_sdxl.py`` does
them inline); the noise, timestep and loss steps stay in the script's ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from mm_subspace.caption_data import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


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
    """Fill ``class_dir`` up to ``--num_class_images`` with base-pipeline samples of ``--class_prompt``. Call on every
    rank: the missing images are split across the ranks (as diffusers does), each seeded by its index, so the
    images do not depend on the number of processes."""
    from diffusers import StableDiffusionXLPipeline
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    have = len([p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    accelerator.wait_for_everyone()  # every rank counted before any writes
    mine = list(range(have, args.num_class_images))[accelerator.process_index::accelerator.num_processes]
    if have >= args.num_class_images:
        return
    logger.info("generating %d class images of %r in %s (%d on this rank of %d)", args.num_class_images - have,
                args.class_prompt, class_dir, len(mine), accelerator.num_processes)
    if mine:
        precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        pipe = StableDiffusionXLPipeline.from_pretrained(model_path, revision=args.revision, variant=args.variant,
                                                         dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(accelerator.device)
        bar = tqdm(total=len(mine), desc="class images", unit="img", disable=not accelerator.is_local_main_process)
        for start in range(0, len(mine), args.sample_batch_size):
            idx = mine[start: start + args.sample_batch_size]
            gens = [torch.Generator().manual_seed(args.seed * 100_003 + i) for i in idx]
            images = pipe([args.class_prompt] * len(idx), generator=gens, height=resolution, width=resolution,
                          num_inference_steps=args.class_inference_steps).images
            for i, image in zip(idx, images):
                image.save(class_dir / f"class_{i:05d}.png")
            bar.update(len(idx))
        bar.close()
        del pipe
    accelerator.wait_for_everyone()


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The SDXL pipeline's latent -> image step in fp32 outside autocast (as diffusers upcasts its VAE): images in
    [-1, 1], (b, 3, h, w). A half-precision VAE is upcast for the call and cast back (the training VAE is fp32)."""
    cfg = vae.config
    dtype = vae.dtype
    with torch.autocast(latents.device.type, enabled=False), torch.no_grad():
        if dtype != torch.float32:
            vae.to(torch.float32)
        try:
            latents = latents.to(torch.float32)
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / cfg.scaling_factor + mean
            else:
                latents = latents / cfg.scaling_factor
            images = vae.decode(latents, return_dict=False)[0]
        finally:
            if dtype != torch.float32:
                vae.to(dtype)
    return images


def chunked_calls(prompt: str, n: int, batch_size: int, seed: int, **sampler: Any) -> list[dict[str, Any]]:
    """Pipeline calls for ``n`` images of ``prompt``, ``batch_size`` per call; image ``i`` seeded ``seed + i`` (its own
    generator), so the chunking does not change an image."""
    return [{"prompt": prompt, "num_images_per_prompt": len(idx), **sampler,
             "generator": [torch.Generator().manual_seed(seed + i) for i in idx]}
            for idx in (range(start, min(start + batch_size, n)) for start in range(0, n, batch_size))]


def validation_images(pipe: Any, calls: list[dict[str, Any]], weight_dtype: torch.dtype, progress: bool = True) -> list[Any]:
    """The images of ``calls`` (``pipe`` keyword arguments each, e.g. :func:`chunked_calls`), with a progress bar. The
    denoising runs under autocast to ``weight_dtype``; the latents are decoded by :func:`decode_latents` in fp32
    outside it. A NaN/inf image is logged as an error naming the cause and the fix (the images are still returned)."""
    from tqdm.auto import tqdm

    autocast = (torch.autocast(pipe.unet.device.type, dtype=weight_dtype) if weight_dtype != torch.float32
                else contextlib.nullcontext())
    images: list[Any] = []
    bad, bad_latents = 0, False
    for call in tqdm(calls, desc="Validation", disable=not progress, leave=False):
        with autocast:
            latents = pipe(**call, output_type="latent").images
        bad_latents |= not bool(torch.isfinite(latents).all())
        pixels = decode_latents(pipe.vae, latents)
        bad += int((~torch.isfinite(pixels)).flatten(1).any(1).sum())
        if getattr(pipe, "watermark", None) is not None:
            pixels = pipe.watermark.apply_watermark(pixels)
        images += pipe.image_processor.postprocess(torch.nan_to_num(pixels), output_type="pil")
    if bad and bad_latents:
        logger.error("validation: %d of %d images are NaN/inf because the UNet's latents are (%s): the adapter or the "
                     "fp16 run diverged; try --mixed_precision bf16 or a lower --learning_rate", bad, len(images),
                     str(weight_dtype).replace("torch.", ""))
    elif bad:
        logger.error("validation: %d of %d images are NaN/inf although the latents are finite: the VAE overflows; pass "
                     "one that is stable in half precision with --pretrained_vae_model_name_or_path (e.g. "
                     "madebyollin/sdxl-vae-fp16-fix)", bad, len(images))
    return images


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


def draw_noise(noise_scheduler: Any, latents: torch.Tensor, generator: torch.Generator, noise_offset: float,
               edm: bool) -> dict[str, torch.Tensor]:
    """A micro step's noise and timesteps, all drawn from ``generator`` (in this order: noise, offset, timesteps).

    ``noise_offset`` adds a per-channel constant to the noise. EDM-style (Karras et al. 2022): a sigma per
    sample and its matching (continuous) timestep; otherwise DDPM timestep indices.
    Returns ``{"noise", "timesteps"}`` (+ ``"sigmas"`` (b, 1, 1, 1) with ``edm``) on the latents' device.
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
        noise = noise + noise_offset * offset.to(device)
    index = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    if not edm:
        return {"noise": noise, "timesteps": index.to(device)}
    return {"noise": noise, "timesteps": noise_scheduler.timesteps[index].to(device),
            "sigmas": noise_scheduler.sigmas[index].to(device, dtype=latents.dtype).view(-1, 1, 1, 1)}


def diffusion_loss(noise_scheduler: Any, batch: dict[str, torch.Tensor], pred: torch.Tensor, *, edm: bool,
                   edm_scheduler: bool, snr_gamma: float | None, prior_loss_weight: float | None) -> torch.Tensor:
    """The DreamBooth loss of one micro-batch: MSE to the scheduler's target, per sample, then averaged.

    Target: x0 with ``edm`` (weighted 1/σ² on the Euler-scheduler path, as diffusers), else ε or v by the
    scheduler's prediction type. ``snr_gamma``: Min-SNR weighting (Hang et al. 2023, Eq. 8; +1 for v).
    ``prior_loss_weight`` (prior preservation on): the batch's second half are class rows, added with this
    weight (DreamBooth, Ruiz et al. 2023, Eq. 2).
    """
    from diffusers.training_utils import compute_snr

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
    n = per_sample.shape[0] // 2 if prior_loss_weight is not None else per_sample.shape[0]
    per_sample, prior = per_sample[:n], per_sample[n:]  # instance rows first, class rows second
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, batch["timesteps"][:n])
        weight = torch.clamp(snr, max=snr_gamma) / snr
        if prediction_type == "v_prediction":
            weight = weight + 1
        per_sample = per_sample * weight
    loss = per_sample.mean()
    if prior_loss_weight is not None:
        loss = loss + prior_loss_weight * prior.mean()
    return loss


def encode_latents(vae: Any, dtype: torch.dtype, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (-1..1) to the UNet's latents in ``dtype``: a VAE sample (drawn from ``generator``), shifted by the
    VAE's ``latents_mean`` / ``latents_std`` when its config has them, scaled by its ``scaling_factor``."""
    with torch.no_grad():
        latents = vae.encode(x.to(vae.device, dtype=vae.dtype)).latent_dist.sample(generator=generator)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return ((latents - mean) * vae.config.scaling_factor / std).to(dtype)
    return (latents * vae.config.scaling_factor).to(dtype)
