"""Small demo adapters for tests, benchmarks and the comparison app, made with minimal training loops.

* :func:`make_demo_sdxl_adapter` — a few DreamBooth-style steps on an :class:`SDXLAdapters` pipeline,
  saved in the DreamBooth output layout (``unet/`` ...).
* :func:`train_visual_instruction` — a minimal visual-instruction loop (LLaVA stage 2, Liu et al. 2023,
  §4.2: the loss is the answer tokens' cross-entropy only); :func:`make_demo_llava_adapter` uses it on
  :data:`DEMO_EXAMPLES` (real digits scans).

The full training scripts are :mod:`mm_subspace.training.dreambooth_sdxl` and
:mod:`mm_subspace.training.visual_instruction`; the pipelines (:mod:`mm_subspace.pipelines`) only load
and run adapters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_subspace.pipelines.adapters import AdapterInfo, adapter_info
from mm_subspace.presets import LLAVA_LM_TARGETS

if TYPE_CHECKING:
    import PIL.Image

    from mm_subspace.pipelines import LlavaAdapters, SDXLAdapters

logger = logging.getLogger(__name__)

__all__ = ["DEMO_ADAPTERS", "DEMO_EXAMPLES", "DEMO_METHODS", "demo_adapters_path", "demo_examples", "make_demo_llava_adapter",
           "make_demo_sdxl_adapter", "train_visual_instruction"]

#: the demo adapters shipped with the package (``mm_subspace/weights/<DEMO_ADAPTERS>``, made by
#: ``training/make_demo_adapters.py``): DreamBooth-SDXL and LLaVA adapters of each method in DEMO_METHODS
DEMO_ADAPTERS = "demo-adapters"
DEMO_METHODS = ("lora", "moslora")


def demo_adapters_path() -> Path:
    """The shipped demo adapters' folder (``dreambooth-sdxl-lora/``, ``-moslora/``, ``llava-lora/``, ``llava-moslora/``),
    every file checked against its manifest first (:func:`mm_subspace.shipped.shipped_path`).

    The SDXL ones are the headline DreamBooth run on the embedded digits SDXL (the held-out 9, ``"a handwritten digit
    sks"``); the LLaVA ones are tiny instruction adapters of the embedded digits LLaVA. Load them with
    ``SDXLAdapters.load_adapters(find_adapters([demo_adapters_path()]))``.
    """
    from mm_subspace.shipped import shipped_path

    return shipped_path(DEMO_ADAPTERS)


def make_demo_sdxl_adapter(
    sd: SDXLAdapters,
    out_dir: str | os.PathLike[str],
    method: str = "moslora",
    rank: int = 4,
    steps: int = 3,
    seed: int = 0,
    train_text_encoder: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **config: Any,
) -> AdapterInfo:
    """A small DreamBooth-style SDXL adapter, saved in the DreamBooth output layout (``unet/`` ...).

    ``steps=0`` saves the adapter as injected (with ``init_weights=False``: random non-zero factors,
    for tests). Injects ``method`` into the UNet (``sdxl_unet`` preset; text encoders with ``sdxl_text_encoders``
    when asked), takes ``steps`` AdamW steps of the epsilon-prediction loss on real cat photos
    (scikit-image's ``chelsea``, "a photo of sks cat"), saves, and removes the adapter again. Used
    for tests and benchmarks (the app trains its demo adapters with ``training/dreambooth_sdxl.py``).
    """
    import torch

    import mm_subspace as mms
    from mm_subspace.tiny_models import cat_photos

    pipe, name = sd.pipe, f"_demo_{method}"
    parts = {"unet": "sdxl_unet"}
    if train_text_encoder:
        parts.update({"text_encoder": "sdxl_text_encoders", "text_encoder_2": "sdxl_text_encoders"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component, preset in parts.items():
            mms.inject(getattr(pipe, component), mms.config_for(method, rank=rank, alpha=rank, targets=preset, **config), name)
        try:
            if steps > 0:
                photos = cat_photos(2, size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
                _train_steps(pipe, list(parts), name, steps, photos, progress)
            for component in parts:
                mms.save_adapter(getattr(pipe, component), os.path.join(out_dir, component), name)
        finally:
            for component in parts:
                mms.remove_adapter(getattr(pipe, component), name)
                getattr(pipe, component).eval()
            sd._apply()
    return adapter_info(out_dir)


def _train_steps(pipe: Any, components: list[str], name: str, steps: int, photos: list[Any],
                 progress: Callable[[int, int], None] | None) -> None:
    """A few DreamBooth steps: noise the photos' latents, predict the noise, MSE (Ruiz et al. 2023, Eq. 1)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    import mm_subspace as mms

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    modules = [getattr(pipe, c) for c in components]
    for module in modules:
        mms.set_adapter(module, name)
        module.train()  # adapters record their aux losses (SuLoRA, MPC) in training mode; the caller restores eval
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    pixels = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 127.5 - 1 for p in photos])).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
    size = pixels.shape[-1]
    for step in range(steps):
        with torch.set_grad_enabled("text_encoder" in components):
            embeds, _, pooled, _ = pipe.encode_prompt(["a photo of sks cat"] * len(photos), do_classifier_free_guidance=False)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(photos),))
        noisy = scheduler.add_noise(latents, noise, t)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(len(photos), 1)
        pred = pipe.unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred.float(), noise.float()) + mms.aux_loss(pipe.unet)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, steps)


def train_visual_instruction(
    llava: LlavaAdapters,
    name: str,
    examples: Sequence[tuple[PIL.Image.Image | None, str, str]],
    steps: int = 20,
    lr: float = 1e-2,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """A minimal visual-instruction loop: fit adapter ``name`` to (image, question, answer) triples.

    Loss = cross-entropy of the answer tokens only (prompt and image positions are masked with
    -100, as in LLaVA's stage-2 instruction tuning). Plain AdamW on the adapter's trainable
    parameters, one full batch per step. Returns the loss per step. The adapter must already be
    injected (``mm_subspace.inject(llava.model, config, name)``).
    """
    import torch

    import mm_subspace as mms

    model = llava.model
    mms.set_adapter(model, name)
    batch: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "labels": [], "pixel_values": []}
    for image, question, answer in examples:
        prompt_len = llava.inputs(question, image)["input_ids"].shape[1]
        full = llava.inputs(question, image, answer=answer)
        labels = full["input_ids"].clone()
        labels[:, :prompt_len] = -100
        batch["labels"].append(labels)
        for key in ("input_ids", "attention_mask", "pixel_values"):
            if key in full:
                batch[key].append(full[key])
    width = max(t.shape[1] for t in batch["input_ids"])
    pad = llava.tokenizer.pad_token_id

    def right_pad(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

    tensors = {"input_ids": right_pad(batch["input_ids"], pad), "attention_mask": right_pad(batch["attention_mask"], 0),
               "labels": right_pad(batch["labels"], -100)}
    if batch["pixel_values"]:
        tensors["pixel_values"] = torch.cat(batch["pixel_values"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    from mm_subspace.inject import routing
    from mm_subspace.methods.sulora import prompt_route_mask

    route = prompt_route_mask(tensors["attention_mask"], tensors["labels"])
    try:
        for step in range(steps):
            with routing(model, route, cache=False):  # SuLoRA: route on the prompt, as generate() does
                loss = model(**tensors).loss + mms.aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, steps)
    finally:
        model.eval()
        llava._apply()
    return losses


#: the demo's instruction data: (digits scan index, question, answer) — held-out tasks of the shipped tiny LLaVA
DEMO_EXAMPLES = (
    (0, "is the digit even? answer yes or no.", "yes"),
    (1, "is the digit even? answer yes or no.", "no"),
    (2, "what is the digit plus one? answer with a word.", "three"),
    (3, "what is the digit plus one? answer with a word.", "four"),
    (5, "is the digit even? answer yes or no.", "no"),
    (6, "what is the digit plus one? answer with a word.", "seven"),
)


def demo_examples() -> list[tuple[PIL.Image.Image, str, str]]:
    """:data:`DEMO_EXAMPLES` with their images (real scikit-learn digits scans, 32 px)."""
    from mm_subspace.data.llava import digit_image, digit_label

    assert all(digit_label(i) == i for i, _, _ in DEMO_EXAMPLES)  # scans 0-9 are the digits 0-9
    return [(digit_image(i), q, a) for i, q, a in DEMO_EXAMPLES]


def make_demo_llava_adapter(
    llava: LlavaAdapters,
    out_dir: str | os.PathLike[str],
    method: str = "moslora",
    rank: int = 4,
    steps: int = 20,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **config: Any,
) -> AdapterInfo:
    """Train a tiny LLaVA adapter with :func:`train_visual_instruction` on :data:`DEMO_EXAMPLES` and save it.

    The adapter targets the language model's projections (``llama`` preset); it is removed from
    ``llava`` after saving (load it back with ``llava.load_adapter(out_dir)``).
    """
    import torch

    import mm_subspace as mms

    name = f"_demo_{method}"
    examples = demo_examples()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        targets = LLAVA_LM_TARGETS if llava.has_vision else "llama"
        mms.inject(llava.model, mms.config_for(method, rank=rank, alpha=2 * rank, targets=targets, **config), name)
        try:
            if steps > 0:
                losses = train_visual_instruction(llava, name, examples, steps=steps, progress=progress)
                logger.info("demo %s adapter: loss %.3f -> %.3f", method, losses[0], losses[-1])
            mms.save_adapter(llava.model, out_dir, name)
        finally:
            mms.remove_adapter(llava.model, name)
            llava._apply()
    return adapter_info(out_dir)
