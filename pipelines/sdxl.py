"""Our adapters in a diffusers ``StableDiffusionXLPipeline``, and batched side-by-side generation.

:class:`SDXLAdapters` loads any number of saved adapters (UNet and text encoders; SuLoRA and other
methods that cannot be folded to plain LoRA included) by name, switches, disables, scales, merges
and unmerges them, and generates:

* :meth:`SDXLAdapters.generate` — one run with one adapter (or the base), exactly the stock pipeline;
* :meth:`SDXLAdapters.generate_batch` — K adapters (``None`` = base) in ONE denoising loop. The
  prompt is repeated K times; row ``i`` of every text-encoder and UNet batch (tiled over classifier-free
  guidance's doubled batch) goes through adapter ``i`` only, via ``mm_subspace.forward_context(...,
  adapter_rows=...)``. Each row gets its own ``torch.Generator`` seeded with ``seed``, so its initial
  latents are the ones a single run with that seed draws: row ``i`` equals ``generate(adapter_i, seed)``.

Example::

    from mm_subspace.pipelines.sdxl import SDXLAdapters
    sd = SDXLAdapters.from_pretrained()                     # tiny offline default; or an SDXL folder / hub id
    sd.load_adapters(["runs/dreambooth-sdxl-lora", "runs/dreambooth-sdxl-moslora"])
    results = sd.generate_batch("a handwritten digit sks", ["lora", "moslora", None], seed=0)
    for r in results: r.image.save(f"{r.label}.png")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .adapters import SDXL_COMPONENTS, AdapterInfo, AdapterSet

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

__all__ = ["BASE_LABEL", "Generation", "SDXLAdapters", "check_sdxl_request"]

BASE_LABEL = "base"
#: limits of a generation request (the app rejects anything outside them with this message)
MAX_STEPS = 150
MIN_SIZE, MAX_SIZE = 32, 2048
MAX_ROWS = 16


@dataclass
class Generation:
    """One adapter's output of a (batched or single) generation.

    Attributes:
        label: adapter name, or ``"base"``.
        image: a PIL image (``output_type="pil"``) or a float array (H, W, 3) in [0, 1] (``"np"``).
        seconds: wall time of this adapter's image; in a batched call the loop's time / K.
        info: the adapter's description (``None`` for the base).
    """

    label: str
    image: Any
    seconds: float
    info: AdapterInfo | None = None
    batched: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def caption(self) -> str:
        how = "batched share" if self.batched else "own run"
        what = self.info.summary() if self.info is not None else "no adapter"
        return f"{self.label} — {what} — {self.seconds:.2f} s ({how})"


def check_sdxl_request(prompt: str, steps: int, height: int, width: int, guidance: float, rows: int) -> None:
    """Raise ``ValueError`` naming the problem for an empty prompt, absurd sizes/steps or no adapter."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type what the image should show")
    if not (isinstance(steps, int) or float(steps).is_integer()) or not 1 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps}")
    for what, value in (("height", height), ("width", width)):
        if not float(value).is_integer() or not MIN_SIZE <= int(value) <= MAX_SIZE or int(value) % 8:
            raise ValueError(f"{what} must be a multiple of 8 from {MIN_SIZE} to {MAX_SIZE} pixels, got {value}")
    if not 0.0 <= float(guidance) <= 30.0:
        raise ValueError(f"guidance must be between 0 and 30, got {guidance}")
    if rows < 1:
        raise ValueError("select at least one adapter (or the base) to generate")
    if rows > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} adapters per generation, got {rows}")


class SDXLAdapters(AdapterSet):
    """A ``StableDiffusionXLPipeline`` with several of our adapters on its UNet and text encoders.

    Args:
        pipe: the diffusers pipeline (its UNet / text encoders are adapted in place).
    """

    family = "sdxl"

    def __init__(self, pipe: StableDiffusionXLPipeline) -> None:
        components = {c: getattr(pipe, c) for c in SDXL_COMPONENTS if getattr(pipe, c, None) is not None}
        super().__init__(components)
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str] | None = None, torch_dtype: torch.dtype | None = None
    ) -> SDXLAdapters:
        """Load an SDXL pipeline (a folder or hub id); ``None`` = the tiny offline default."""
        import torch

        if pretrained_model_name_or_path is None:
            from mm_subspace.tiny_models import tiny_sdxl_pipeline

            return cls(tiny_sdxl_pipeline(torch_dtype))
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(pretrained_model_name_or_path, dtype=torch_dtype or torch.float32)
        return cls(pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _generator(self, seed: int) -> torch.Generator:
        import torch

        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _call(self, prompt: str, k: int, seed: int, callback: Callable[[int, int], None] | None, **kwargs: Any) -> Any:
        steps = kwargs["num_inference_steps"]

        def on_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if callback is not None:
                callback(i + 1, steps)
            return tensors

        negative = kwargs.pop("negative_prompt", None) or None
        out = self.pipe(
            prompt=[prompt] * k if k > 1 else prompt,
            negative_prompt=([negative] * k if k > 1 else negative) if negative else None,
            generator=[self._generator(seed) for _ in range(k)] if k > 1 else self._generator(seed),
            callback_on_step_end=on_step if callback is not None else None,
            **kwargs,
        )
        return out.images

    def generate(
        self,
        prompt: str,
        adapter: str | None = None,
        seed: int = 0,
        negative_prompt: str | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """One image with only ``adapter`` active (``None`` = the base): the stock pipeline call."""
        with self.using(adapter):
            start = time.perf_counter()
            images = self._call(
                prompt, 1, seed, callback, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, height=height, width=width, output_type=output_type,
            )
            seconds = time.perf_counter() - start
        return Generation(adapter or BASE_LABEL, images[0], seconds, self.adapters.get(adapter) if adapter else None)

    def generate_batch(
        self,
        prompt: str,
        adapters: Sequence[str | None],
        seed: int = 0,
        negative_prompt: str | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        scales: dict[str, float] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """Images for K adapters (``None`` = base) from one prompt and seed, in one denoising loop.

        Row ``i`` equals ``generate(prompt, adapters[i], seed, ...)`` (up to float rounding of a
        different batch size): same initial latents (one generator per row, all seeded ``seed``), same
        text embeddings (text encoders routed per row too), and the UNet routes row ``i`` and its
        classifier-free-guidance twin ``K + i`` through adapter ``i``.

        Args:
            scales: per-adapter scale (``set_scale``) applied before the call and kept.
        """
        adapters = self.batch_rows(adapters, scales, "generate_batch")
        with self.routed(adapters):
            start = time.perf_counter()
            images = self._call(
                prompt, len(adapters), seed, callback, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                output_type=output_type,
            )
            seconds = (time.perf_counter() - start) / len(adapters)
        return [
            Generation(name or BASE_LABEL, image, seconds, self.adapters.get(name) if name else None, batched=True)
            for name, image in zip(adapters, images)
        ]

    def generate_sequential(self, prompt: str, adapters: Sequence[str | None], **kwargs: Any) -> list[Generation]:
        """The reference for :meth:`generate_batch`: K separate :meth:`generate` calls."""
        scales = kwargs.pop("scales", None) or {}
        for name, scale in scales.items():
            self.set_scale(name, scale)
        return [self.generate(prompt, name, **kwargs) for name in adapters]
