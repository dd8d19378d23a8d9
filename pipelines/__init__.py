"""Our adapters inside diffusers and transformers pipelines, with batched side-by-side generation.

* :mod:`mm_subspace.pipelines.adapters` — find saved adapters on disk (flat folders and DreamBooth outputs),
  describe them, and :class:`AdapterSet`: load / switch / disable / scale / merge / route over the
  components of one pipeline.
* :mod:`mm_subspace.pipelines.sdxl` — :class:`SDXLAdapters` around a ``StableDiffusionXLPipeline``:
  ``generate`` (one adapter) and ``generate_batch`` (K adapters, one denoising loop).
* :mod:`mm_subspace.pipelines.llava` — :class:`LlavaAdapters` around a LLaVA / LLaMA model: ``answer`` and
  ``answer_batch`` (K adapters, one batched greedy ``generate``).

Installed as ``mm_subspace.pipelines`` (the folder is ``pipelines/`` at the top of the repository). No
training here: the scripts and the demo-adapter loops are in :mod:`mm_subspace.training`.

Heavy libraries (diffusers, transformers) are imported when a pipeline is built, not here.
"""

from __future__ import annotations

from .adapters import TABLE_HEADERS, AdapterInfo, AdapterSet, adapter_info, find_adapters
from .llava import Answer, LlavaAdapters, check_llava_request, save_merged_llava
from .sdxl import BASE_LABEL, Generation, SDXLAdapters, check_sdxl_request

__all__ = [
    "BASE_LABEL",
    "TABLE_HEADERS",
    "AdapterInfo",
    "AdapterSet",
    "Answer",
    "Generation",
    "LlavaAdapters",
    "SDXLAdapters",
    "adapter_info",
    "check_llava_request",
    "check_sdxl_request",
    "find_adapters",
    "save_merged_llava",
]
