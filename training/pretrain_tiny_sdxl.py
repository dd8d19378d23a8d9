#!/usr/bin/env python
"""Pretrain the embedded tiny SDXL on real handwritten digits (0-8; 9 is held out for DreamBooth).

    accelerate launch training/pretrain_tiny_sdxl.py --seed 0 --ship

Real diffusers/transformers classes (``AutoencoderKL``, ``UNet2DConditionModel`` with SDXL's
``text_time`` conditioning, ``CLIPTextModel`` + ``CLIPTextModelWithProjection``, real CLIP BPE
tokenizers), the architecture of ``mm_subspace.tiny_models.tiny_sdxl_components``. Data:
scikit-learn's digits, the fixed train split of ``mm_subspace.eval.digits`` (digits 0-8 only),
8x8 scans upscaled to 32x32 RGB, dark ink on white.

1. **VAE** (reconstruction MSE + ``--kl_weight`` x KL, Kingma & Welling 2014), then
   ``scaling_factor`` = 1 / std of the training latents (as SD/SDXL's 0.18215 / 0.13025).
2. **UNet** on the VAE's latents (8x8x4), ε-prediction with SDXL's scaled-linear DDPM schedule,
   Min-SNR-5 weighting (Hang et al. 2023), prompts that name the digit (:data:`PROMPT_TEMPLATES`),
   ``--class_prompt_prob`` of "a handwritten digit" (any digit; DreamBooth's class prompt) and
   ``--uncond_prob`` of zeroed text conditioning, which is what the pipeline's
   ``force_zeros_for_empty_prompt`` feeds as the negative branch of classifier-free guidance.
   The two CLIP text encoders train jointly with the UNet (``--text_encoder_lr``; with them frozen at
   their random init the prompts' embeddings are nearly identical and the UNet ignores them: 18 %
   prompt accuracy after 500 steps). The EMA of the UNet and text-encoder weights is what ships.
   Latents are the VAE posterior means (``--latents mode``; its posterior std is large, ~0.7).
3. ``save_pretrained`` (fp32) -> fp16 copy (its text encoders' configs declare float32, so stock
   ``StableDiffusionXLPipeline.from_pretrained`` loads it without ``torch_dtype``) -> the metric
   (:func:`mm_subspace.eval.digits.prompt_accuracy`) on the fp16 copy -> ``write_manifest``. ``--ship`` writes the fp16 copy to
   ``mm_subspace/weights/tiny-sdxl-digits``.

Deterministic for a given ``--seed`` and thread count: every random draw of step ``k`` of phase
``p`` comes from ``step_generator(seed, p, k)``. ``--output_dir/checkpoint.pt`` is written atomically
every ``--checkpointing_steps``; rerunning the same command resumes from it (after a kill).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm_subspace import tiny_models
from mm_subspace.atomic import atomic_paths
from mm_subspace.compat import declare_float32_configs
from mm_subspace.eval import digits as D
from mm_subspace.shipped import WEIGHTS_DIR, write_manifest
from mm_subspace.training_utils import LossHistory, save_image_grid, save_loss_curve, step_generator

logger = logging.getLogger("pretrain_tiny_sdxl")

SHIP_NAME = "tiny-sdxl-digits"
PHASE_VAE, PHASE_UNET, PHASE_DONE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="Seed of every random draw (data order, noise, timesteps, prompts); the init is "
                                                       "tiny_models' fixed one.")
    p.add_argument("--output_dir", type=str, default="runs/pretrain-tiny-sdxl")
    p.add_argument("--ship", action="store_true", help=f"Write the fp16 pipeline + manifest to mm_subspace/weights/{SHIP_NAME}.")
    p.add_argument("--num_threads", type=int, default=None, help="torch intra-op threads (1 is fastest on a busy machine).")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae_steps", type=int, default=400)
    g.add_argument("--vae_batch_size", type=int, default=32)
    g.add_argument("--vae_lr", type=float, default=1e-3)
    g.add_argument("--kl_weight", type=float, default=1e-3, help="Weight of the per-element KL term.")
    g = p.add_argument_group("UNet")
    g.add_argument("--unet_steps", type=int, default=1000)
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--learning_rate", type=float, default=2e-3)
    g.add_argument("--warmup_steps", type=int, default=50)
    g.add_argument("--weight_decay", type=float, default=1e-2)
    g.add_argument("--snr_gamma", type=float, default=5.0)
    g.add_argument("--ema_decay", type=float, default=0.995)
    g.add_argument("--text_encoder_lr", type=float, default=None, help="Default: --learning_rate. 0 freezes them.")
    g.add_argument("--latents", choices=["mode", "sample"], default="mode",
                   help="Diffusion data: VAE posterior means, or samples of the posterior.")
    g.add_argument("--uncond_prob", type=float, default=0.1, help="Prompt dropout (zeroed conditioning) for CFG.")
    g.add_argument("--class_prompt_prob", type=float, default=0.1, help=f"Share of the class prompt {D.CLASS_PROMPT!r}.")
    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--checkpointing_steps", type=int, default=250)
    g.add_argument("--eval_n_per_digit", type=int, default=20, help="Images per digit of the ship-time metric.")
    return p


# ------------------------------------------------------------------------------------------- helpers
def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_paths(path) as (tmp,):  # temp file + fsync + rename, leftovers of killed runs cleaned
        torch.save(obj, tmp)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            e.lerp_(m.detach(), 1.0 - decay)


def _tokenize(components: dict[str, Any], prompts: list[str]) -> list[torch.Tensor]:
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in (components["tokenizer"], components["tokenizer_2"])]


def _encode_prompts(encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning (as ``StableDiffusionXLPipeline.encode_prompt``): (P, 77, 64) penultimate hidden states of
    both encoders concatenated, (P, 32) pooled projection of the second."""
    embeds = []
    pooled = None
    for enc, tokens in zip(encoders, ids):
        out = enc(tokens.to(next(enc.parameters()).device), output_hidden_states=True)
        embeds.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(embeds, -1), pooled


def vae_recon_accuracy(vae: torch.nn.Module, scans: Any, labels: Any) -> float:
    """Classifier accuracy on VAE reconstructions (posterior mean) of ``scans``."""
    clf = D.digit_classifier()
    x = D.digit_pixels(scans)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    arrays = ((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return float((clf.model.predict(D.to_8x8(list(arrays))) == labels).mean())


def _run_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags that change the trained weights (a resumed run must match them)."""
    return {k: v for k, v in flags.items() if k not in ("ship", "num_threads", "output_dir", "eval_n_per_digit")}


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise SystemExit("pretrain_tiny_sdxl.py is single-process (the model is tiny); launch without --num_processes")
    device = accelerator.device
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    command = "accelerate launch training/pretrain_tiny_sdxl.py " + shlex.join(sys.argv[1:])

    # -- data: the shared fixed split, digits 0-8 only ------------------------------------------------
    x_tr, y_tr, x_te, y_te = D.digits_split()
    keep = [i for i, y in enumerate(y_tr) if int(y) in D.PRETRAIN_DIGITS]
    scans, labels = x_tr[keep], y_tr[keep]
    assert D.SUBJECT_DIGIT not in set(labels.tolist())
    pixels = D.digit_pixels(scans).to(device)  # (n, 3, 32, 32) in [-1, 1]
    n = len(pixels)
    logger.info("training on %d train-split scans of digits %s (9 held out)", n, list(D.PRETRAIN_DIGITS))

    components = tiny_models.tiny_sdxl_components()  # tiny_models' seeded init (= the random builder's)
    vae, unet = components["vae"].to(device), components["unet"].to(device)
    encoders = [components["text_encoder"].to(device), components["text_encoder_2"].to(device)]
    te_lr = args.learning_rate if args.text_encoder_lr is None else args.text_encoder_lr
    for enc in encoders:
        enc.requires_grad_(te_lr > 0).train(te_lr > 0)
    shadow = tiny_models.tiny_sdxl_components()  # same architectures; EMA weights copied below
    ema = torch.nn.ModuleList([shadow["unet"], shadow["text_encoder"], shadow["text_encoder_2"]]).to(device)
    online = torch.nn.ModuleList([unet, *encoders])
    ema.load_state_dict(online.state_dict())
    ema.requires_grad_(False)

    # -- prompts: table of every prompt used, tokenised once ----------------------------------------------
    prompts = [D.CLASS_PROMPT] + [t.format(word=D.DIGIT_WORDS[d]) for d in D.PRETRAIN_DIGITS for t in D.PROMPT_TEMPLATES]
    prompt_ids = _tokenize(components, prompts)
    n_templates = len(D.PROMPT_TEMPLATES)
    label_pos = {d: i for i, d in enumerate(D.PRETRAIN_DIGITS)}
    label_index = torch.tensor([label_pos[int(y)] for y in labels], device=device)

    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    groups = [{"params": list(unet.parameters()), "lr": args.learning_rate}]
    if te_lr > 0:
        groups.append({"params": [p for e in encoders for p in e.parameters()], "lr": te_lr})
    unet_opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)

    def unet_lr(step: int) -> float:  # linear warm-up, cosine to 10 %
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, args.unet_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    unet_sched = torch.optim.lr_scheduler.LambdaLR(unet_opt, unet_lr)
    history = {"vae": LossHistory(), "unet": LossHistory()}
    state: dict[str, Any] = {"phase": PHASE_VAE, "step": 0, "scaling_factor": None, "seconds": 0.0}

    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True)  # tensors, numbers, strings only
        if _run_flags(ck["args"]) != _run_flags(vars(args)):
            raise SystemExit(f"{ckpt_path} was written with other flags ({ck['args']}); use another --output_dir")
        vae.load_state_dict(ck["vae"]), online.load_state_dict(ck["online"]), ema.load_state_dict(ck["ema"])
        vae_opt.load_state_dict(ck["vae_opt"]), unet_opt.load_state_dict(ck["unet_opt"])
        unet_sched.load_state_dict(ck["unet_sched"])
        for k, h in history.items():
            h.load_state_dict(ck["history"][k])
        state = ck["state"]
        logger.info("resumed from %s: phase %d step %d", ckpt_path, state["phase"], state["step"])
    if state["scaling_factor"] is not None:
        vae.register_to_config(scaling_factor=state["scaling_factor"])

    def checkpoint() -> None:
        state["seconds"] = state["seconds"] + time.time() - checkpoint.t0
        checkpoint.t0 = time.time()
        _atomic_save({"args": vars(args), "vae": vae.state_dict(), "online": online.state_dict(), "ema": ema.state_dict(),
                      "vae_opt": vae_opt.state_dict(), "unet_opt": unet_opt.state_dict(),
                      "unet_sched": unet_sched.state_dict(), "state": state,
                      "history": {k: h.state_dict() for k, h in history.items()}}, ckpt_path)

    checkpoint.t0 = time.time()

    # -- phase 1: VAE ----------------------------------------------------------------------------------
    if state["phase"] == PHASE_VAE:
        vae.train()
        bar = tqdm(range(args.vae_steps), initial=state["step"], desc="VAE")
        while state["step"] < args.vae_steps:
            gen = step_generator(args.seed, PHASE_VAE, state["step"])
            idx = torch.randint(0, n, (args.vae_batch_size,), generator=gen)
            x = pixels[idx]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            kl = post.kl().mean() / z[0].numel()
            loss = mse + args.kl_weight * kl
            vae_opt.zero_grad()
            accelerator.backward(loss)
            vae_opt.step()
            state["step"] += 1
            history["vae"].append(state["step"], loss=loss.item(), mse=mse.item(), kl=kl.item())
            bar.update(1)
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
            if state["step"] % args.checkpointing_steps == 0:
                checkpoint()
        bar.close()
        vae.eval()
        with torch.no_grad():
            dists = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, n, 256)]
            std = torch.cat([d.mode() if args.latents == "mode" else d.sample(step_generator(args.seed, 9, i))
                             for i, d in enumerate(dists)]).std().item()
        state.update(phase=PHASE_UNET, step=0, scaling_factor=1.0 / std)
        vae.register_to_config(scaling_factor=1.0 / std)
        logger.info("VAE done: latent std %.4f -> scaling_factor %.4f; test reconstructions read correctly: %.3f",
                    std, 1.0 / std, vae_recon_accuracy(vae, x_te, y_te))
        checkpoint()
    vae.eval().requires_grad_(False)

    # latent posterior of every training image, once
    with torch.no_grad():
        posts = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, n, 256)]
    lat_mean = torch.cat([p.mean for p in posts])
    lat_std = torch.cat([p.std for p in posts]) * (args.latents == "sample")
    sf = vae.config.scaling_factor

    # -- phase 2: UNet -----------------------------------------------------------------------------------
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    res = D.IMAGE_SIZE
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device)
    if state["phase"] == PHASE_UNET:
        unet.train()
        bar = tqdm(range(args.unet_steps), initial=state["step"], desc="UNet + text encoders" if te_lr > 0 else "UNet")
        while state["step"] < args.unet_steps:
            step = state["step"]
            gen = step_generator(args.seed, PHASE_UNET, step)
            b = args.batch_size
            idx = torch.randint(0, n, (b,), generator=gen)
            latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * sf
            noise = torch.randn(latents.shape, generator=gen)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen)
            u = torch.rand(b, generator=gen)
            template = torch.randint(0, n_templates, (b,), generator=gen)
            row = 1 + label_index[idx] * n_templates + template
            row = torch.where(u < args.uncond_prob + args.class_prompt_prob, torch.zeros_like(row), row)
            keep_text = (u >= args.uncond_prob).float()
            with torch.set_grad_enabled(te_lr > 0):
                embeds, pooled = _encode_prompts(encoders, prompt_ids)  # every prompt (46), then pick rows
            enc = embeds[row] * keep_text.view(-1, 1, 1)
            pool = pooled[row] * keep_text.view(-1, 1)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, enc, added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids.expand(b, -1)}).sample
            per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            snr = compute_snr(noise_scheduler, timesteps)
            loss = (per * torch.clamp(snr, max=args.snr_gamma) / snr).mean()
            unet_opt.zero_grad()
            accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            unet_opt.step()
            unet_sched.step()
            state["step"] += 1
            _ema_update(ema, online, min(args.ema_decay, (1 + step) / (10 + step)))
            history["unet"].append(state["step"], loss=loss.item(), mse=per.mean().item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{unet_sched.get_last_lr()[0]:.2e}")
            if state["step"] % args.checkpointing_steps == 0:
                checkpoint()
        bar.close()
        state.update(phase=PHASE_DONE, step=0)
        checkpoint()
    train_seconds = state["seconds"]

    # -- save: fp32 pipeline, fp16 copy, metric on the fp16 copy, manifest -------------------------------
    save_loss_curve(history["vae"], out / "loss_vae.png", "tiny SDXL pretraining: VAE (MSE + KL)")
    save_loss_curve(history["unet"], out / "loss_unet.png", "tiny SDXL pretraining: UNet (Min-SNR ε loss)")
    parts = dict(components, unet=ema[0], text_encoder=ema[1], text_encoder_2=ema[2], vae=vae)
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out / "pipeline-fp32")
    fp16_dir = out / SHIP_NAME
    if fp16_dir.exists():
        shutil.rmtree(fp16_dir)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(fp16_dir, safe_serialization=True)
    declare_float32_configs(fp16_dir)  # stock from_pretrained without torch_dtype: float32 throughout, not fp16 text encoders

    shipped = StableDiffusionXLPipeline.from_pretrained(fp16_dir, dtype=torch.float32, local_files_only=True)
    shipped.set_progress_bar_config(disable=True)
    clf = D.digit_classifier()
    t0 = time.time()
    acc = D.prompt_accuracy(shipped, D.PRETRAIN_DIGITS, args.eval_n_per_digit, seed=0)
    eval_seconds = time.time() - t0
    base_fid = D.subject_fidelity(shipped, D.INSTANCE_PROMPT, n=20, seed=0)
    nine = D.prompt_accuracy(shipped, [D.SUBJECT_DIGIT], 20, seed=0)
    recon = vae_recon_accuracy(vae.float(), x_te, y_te)
    rows = [acc.images[i * args.eval_n_per_digit:(i * args.eval_n_per_digit) + 8] for i in range(len(D.PRETRAIN_DIGITS))]
    grid = save_image_grid([im for r in rows for im in r], out / "samples.png", cols=8)
    metrics = {
        "prompt_accuracy_0_8": round(acc.value, 4),
        "prompt_accuracy_per_digit": {str(k): v for k, v in acc.per_digit.items()},
        "prompt_accuracy_images": acc.n,
        "prompt_accuracy_prompt": D.PROMPT_TEMPLATES[0],
        "base_subject_fidelity_sks": base_fid.value,
        "base_reads_for_sks": {str(k): v for k, v in base_fid.per_digit.items()},
        "base_prompt_accuracy_nine_held_out": nine.value,
        "classifier": "sklearn SVC(gamma=0.001) on the train split after the 8->32->8 round trip",
        "classifier_test_accuracy": round(clf.test_accuracy, 4),
        "vae_test_reconstruction_accuracy": round(recon, 4),
        "final_unet_loss": history["unet"].last("loss"),
        "final_vae_mse": history["vae"].last("mse"),
        "eval_seconds": round(eval_seconds, 1),
    }
    data = {**D.SPLIT, "digits": list(D.PRETRAIN_DIGITS), "held_out": D.SUBJECT_DIGIT, "train_images": n,
            "image_size": D.IMAGE_SIZE, "upscale": "bilinear 8->32, dark ink on white, RGB",
            "prompts": list(D.PROMPT_TEMPLATES), "class_prompt": D.CLASS_PROMPT}
    extra = {"sampler": {**D.SAMPLER, "seeding": "image i: torch.Generator().manual_seed(seed * 100003 + i)"},
             "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
             "training": {k: v for k, v in vars(args).items() if k not in ("ship", "output_dir")},
             "text_encoders": "trained jointly with the UNet from tiny_models' seeded init (EMA shipped)"
             if (args.text_encoder_lr is None or args.text_encoder_lr > 0) else "seeded random init, frozen"}
    write_manifest(fp16_dir, name=SHIP_NAME, command=command, data=data, metrics=metrics, **extra)
    logger.info("metrics: %s", json.dumps(metrics, indent=1))
    logger.info("train %.0f s; samples %s", train_seconds, grid)
    if args.ship:
        dest = WEIGHTS_DIR / SHIP_NAME
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(fp16_dir, dest)
        logger.info("shipped to %s", dest)
    return {"metrics": metrics, "train_seconds": train_seconds, "folder": fp16_dir}


if __name__ == "__main__":
    main(build_parser().parse_args())
