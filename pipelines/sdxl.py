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
import math
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

__all__ = ["BASE_LABEL", "Generation", "RequestTimeout", "SDXLAdapters", "check_sdxl_request", "megapixel_steps"]

BASE_LABEL = "base"
#: limits of a generation request (the app rejects anything outside them with this message)
MAX_STEPS = 150
MIN_SIZE, MAX_SIZE = 32, 2048
MAX_ROWS = 16
#: prompt and negative prompt, in characters (the CLIP tokenizers keep 77 tokens; an 8 MB prompt took minutes to tokenize)
MAX_PROMPT_CHARS = 2000


class RequestTimeout(TimeoutError):
    """A generation ran past its ``timeout`` and was stopped between two denoising steps."""


def megapixel_steps(rows: int, steps: int, height: int, width: int, guidance: float) -> float:
    """The work of a request: UNet evaluations × megapixels (classifier-free guidance doubles the batch)."""
    cfg = 2 if float(guidance) > 1.0 else 1
    return rows * cfg * int(steps) * int(height) * int(width) / 1e6


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


def check_prompt_length(prompt: str | None, what: str = "prompt") -> None:
    """Raise ``ValueError`` for a prompt (or negative prompt) over :data:`MAX_PROMPT_CHARS` characters."""
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the {what} is {len(prompt):,d} characters long; at most {MAX_PROMPT_CHARS:,d} (the text encoders "
                         "read only the first 77 tokens)")


def check_sdxl_request(prompt: str, steps: int, height: int, width: int, guidance: float, rows: int,
                       negative_prompt: str | None = None) -> None:
    """Raise ``ValueError`` naming the problem for an empty or over-long prompt, absurd sizes/steps or no adapter.
    NaN and inf are refused like any other value out of range."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type what the image should show")
    check_prompt_length(prompt)
    check_prompt_length(negative_prompt, "negative prompt")
    for what, value in (("steps", steps), ("height", height), ("width", width), ("guidance", guidance)):
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value}")
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
        #: measured cost of generation on this pipeline's device (seconds per megapixel-step), for :meth:`check_budget`
        self.seconds_per_megapixel_step: float | None = None

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

    def calibrate(self, size: int | None = None, steps: int = 2) -> float:
        """Measure this pipeline's cost on its device: one base image of ``size`` px (default: a quarter of the
        native size, at least 64) and ``steps`` steps. Returns and keeps seconds per megapixel-step."""
        size = size or max(64, self.pipe.default_sample_size * self.pipe.vae_scale_factor // 4)
        self.generate("calibration", None, num_inference_steps=steps, height=size, width=size, output_type="np")
        return self.seconds_per_megapixel_step or 0.0

    def estimate_seconds(self, rows: int, steps: int, height: int, width: int, guidance: float) -> float | None:
        """Seconds a request would take at the measured rate (``None`` before any generation or :meth:`calibrate`)."""
        if self.seconds_per_megapixel_step is None:
            return None
        return megapixel_steps(rows, steps, height, width, guidance) * self.seconds_per_megapixel_step

    def check_budget(self, rows: int, steps: int, height: int, width: int, guidance: float, max_seconds: float) -> None:
        """Raise ``ValueError`` with the budget when a request would take longer than ``max_seconds`` on this device
        (rows × steps × pixels at the measured rate; the rate is the slowest one seen, so estimates err long)."""
        estimate = self.estimate_seconds(rows, steps, height, width, guidance)
        if estimate is not None and estimate > max_seconds:
            work = megapixel_steps(rows, steps, height, width, guidance)
            raise ValueError(
                f"this request is {rows} image(s) x {int(steps)} steps x {int(width)}x{int(height)} px = {work:,.1f} "
                f"megapixel-steps, about {estimate:,.0f} s on this {self.device.type} "
                f"({self.seconds_per_megapixel_step:.3g} s per megapixel-step); the budget is {max_seconds:,.0f} s per "
                "request: use fewer steps, a smaller size or fewer adapters"
            )

    def _call(self, prompt: str, k: int, seed: int, callback: Callable[[int, int], None] | None,
              timeout: float | None = None, **kwargs: Any) -> Any:
        steps = kwargs["num_inference_steps"]
        start = time.perf_counter()

        def on_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if callback is not None:
                callback(i + 1, steps)
            if timeout is not None and time.perf_counter() - start > timeout:
                raise RequestTimeout(f"stopped after step {i + 1} of {steps}: the request ran past its timeout of "
                                     f"{timeout:,.0f} s; use fewer steps, a smaller size or fewer adapters")
            return tensors

        check_prompt_length(prompt)
        negative = kwargs.pop("negative_prompt", None) or None
        check_prompt_length(negative, "negative prompt")
        out = self.pipe(
            prompt=[prompt] * k if k > 1 else prompt,
            negative_prompt=([negative] * k if k > 1 else negative) if negative else None,
            generator=[self._generator(seed) for _ in range(k)] if k > 1 else self._generator(seed),
            callback_on_step_end=on_step if callback is not None or timeout is not None else None,
            **kwargs,
        )
        height = kwargs.get("height") or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        width = kwargs.get("width") or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        work = megapixel_steps(k, steps, height, width, kwargs.get("guidance_scale", 5.0))
        rate = (time.perf_counter() - start) / max(work, 1e-9)
        self.seconds_per_megapixel_step = max(rate, self.seconds_per_megapixel_step or 0.0)
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
        timeout: float | None = None,
    ) -> Generation:
        """One image with only ``adapter`` active (``None`` = the base): the stock pipeline call.

        ``timeout`` (seconds) stops the loop between two steps with :class:`RequestTimeout`."""
        with self.using(adapter):
            start = time.perf_counter()
            images = self._call(
                prompt, 1, seed, callback, timeout, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
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
        timeout: float | None = None,
    ) -> list[Generation]:
        """Images for K adapters (``None`` = base) from one prompt and seed, in one denoising loop.

        Row ``i`` equals ``generate(prompt, adapters[i], seed, ...)`` (up to float rounding of a
        different batch size): same initial latents (one generator per row, all seeded ``seed``), same
        text embeddings (text encoders routed per row too), and the UNet routes row ``i`` and its
        classifier-free-guidance twin ``K + i`` through adapter ``i``.

        Args:
            scales: per-adapter scale (``set_scale``) applied before the call and kept.
            timeout: seconds; the loop stops between two steps with :class:`RequestTimeout` after it.
        """
        adapters = self.batch_rows(adapters, scales, "generate_batch")
        with self.routed(adapters):
            start = time.perf_counter()
            images = self._call(
                prompt, len(adapters), seed, callback, timeout, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                output_type=output_type,
            )
            seconds = (time.perf_counter() - start) / len(adapters)
        return [
            Generation(name or BASE_LABEL, image, seconds, self.adapters.get(name) if name else None, batched=True)
            for name, image in zip(adapters, images)
        ]

    def generate_sequential(self, prompt: str, adapters: Sequence[str | None], **kwargs: Any) -> list[Generation]:
        """The reference for :meth:`generate_batch`: K separate :meth:`generate` calls (``timeout`` covers all K)."""
        scales = kwargs.pop("scales", None) or {}
        timeout = kwargs.pop("timeout", None)
        for name, scale in scales.items():
            self.set_scale(name, scale)
        start, out = time.perf_counter(), []
        for name in adapters:
            left = None if timeout is None else max(0.0, timeout - (time.perf_counter() - start))
            out.append(self.generate(prompt, name, timeout=left, **kwargs))
        return out
