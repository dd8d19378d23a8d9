"""Reporting of the DreamBooth SDXL script: tracker images, model card, digit quality, Hub upload.

Used by :mod:`mm_subspace.training.dreambooth_sdxl` after (and during) training.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

import torch

import mm_subspace
from mm_subspace.eval import digits as digits_eval
from mm_subspace.training_utils import LossHistory, adapter_summary, is_dora, save_image_grid, write_model_card

logger = logging.getLogger(__name__)


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


HUB_EXCLUDE = ("checkpoint-*/*", "training_state/*", "instance_images/*", "class_images/*")




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


def public_value(value: Any) -> Any:
    """A flag value for files that may be published: absolute local paths become their last component."""
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def public_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag except secrets and internals, with local absolute paths shortened (model card, training_args.json)."""
    return {k: public_value(v) for k, v in vars(args).items() if k not in ("embedded_model", "hub_token")}


def stack_grids(paths: list[Path], out: Path) -> Path:
    """The validation grids of ``paths`` one above the other (step 0 on top), saved as ``out``."""
    from PIL import Image

    grids = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height
    return save_image_grid([canvas], out, cols=1)


def digit_quality(args: argparse.Namespace, pipe: Any, resolution: int) -> dict[str, Any]:
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


def model_card(args: argparse.Namespace, output_dir: Path, history: LossHistory, steps: int, total_batch: int,
                world: int, export_note: str, grid: Path | None, curve: Path, parts: dict[str, torch.nn.Module],
                quality: dict[str, Any] | None = None, captions: tuple[int, int] = (0, 0)) -> None:
    """Write the run's README.md. ``captions``: (images with their own caption, all instance images)."""
    name = args.pretrained_model_name_or_path
    local = name is not None and (os.path.isabs(name) or os.path.exists(name))
    hub_base = None if name is None or local else name  # front-matter base_model: hub ids only
    base = (f"local folder `{Path(name).name}`" if local else name) if name else \
        "embedded tiny SDXL (mm_subspace.tiny_models.tiny_sdxl_path())"
    loss = history.last("loss")
    summary = {
        "base model": base,
        "instance prompt": f"`{args.instance_prompt}`",
        "captions": (f"{captions[0]} of {captions[1]} images trained on their own caption (metadata.jsonl / .csv / .txt "
                     f"or --caption_column){'; the others on the instance prompt' if captions[0] < captions[1] else ''}"
                     if captions[0] else "none: every image trained on the instance prompt"),
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
                     f'pipe = StableDiffusionXLPipeline.from_pretrained("{public_value(args.pretrained_model_name_or_path)}")\n')
    else:
        make_pipe = "from mm_subspace.tiny_models import tiny_sdxl_pipeline\n\npipe = tiny_sdxl_pipeline()\n"
    usage = (f"```python\nimport mm_subspace as mms\n{folder}{make_pipe}{load_ours}\n"
             f"image = pipe({args.validation_prompt!r}).images[0]\n```\n")
    if export_note.startswith("`pytorch"):
        usage += (f"\nStock diffusers, no mm_subspace needed:\n\n```python\npipe.load_lora_weights("
                  f'"{repo}")\n```\n')
    usage += f"\nTrigger: use `{args.instance_prompt}` in the prompt"
    usage += (" (the images were trained on their own captions, which contain it or describe the subject: prompts in "
              "their style work best).\n" if captions[0] else ".\n")
    final_grid = output_dir / "validation" / f"step-{steps:06d}.png"  # the last step alone (grid may stack step 0 above it)
    shown = final_grid if final_grid.is_file() else grid
    widget = [{"text": args.validation_prompt, "output": {"url": shown.relative_to(output_dir).as_posix()}}] if shown else None
    write_model_card(
        output_dir, title=f"DreamBooth SDXL — {args.adapter}", base_model=hub_base, method=args.adapter, summary=summary,
        flags=public_flags(args), images=images, sections={"Use it": usage, **({"Quality": quality_section(quality)} if quality else {})},
        tags=("dreambooth", "sdxl", "text-to-image", "diffusers", "diffusers-training", "dora" if is_dora(args.adapter)
              else "lora", "template:sd-lora", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
        front_matter={"license": "apache-2.0" if name is None else "openrail++", "instance_prompt": args.instance_prompt,
                      "widget": widget},
    )


def quality_section(q: dict[str, Any]) -> str:
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


def kohya_export(path: Path, parts: dict[str, Any]) -> str:
    """``--output_kohya_format``: write ``path`` (kohya / A1111 / ComfyUI keys) and return the model card's note; a
    target kohya's SDXL layout cannot name is logged and noted instead (the run's other outputs stand)."""
    import mm_subspace
    from mm_subspace.errors import ConfigError, MergeError

    try:
        kohya = mm_subspace.export_kohya(path, **parts)
    except (ConfigError, MergeError) as err:
        logger.error("--output_kohya_format: no kohya file written: %s", err)
        return f" Not exported to kohya: {err}"
    return f" `{kohya.name}`: kohya / A1111 / ComfyUI keys, mixer folded, true alpha."
