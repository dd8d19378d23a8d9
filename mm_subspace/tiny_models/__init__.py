"""Embedded default models: tiny, randomly initialised, real architecture classes, offline.

Nothing here downloads anything. Every model is built from a config written in this package, with a
fixed seed inside ``torch.random.fork_rng`` (the caller's global RNG is untouched). One module per
concern:

* :mod:`~mm_subspace.tiny_models.cache` — the build-once cache (``cache_dir() / "<name>-v<N>"``).
* :mod:`~mm_subspace.tiny_models.tokenizers` — CLIP's and the tiny LM's tokenizers (open_clip's BPE file).
* :mod:`~mm_subspace.tiny_models.sdxl` — the tiny SDXL pipeline (shipped digits model by default).
* :mod:`~mm_subspace.tiny_models.llava` — tiny LLaMA and LLaVA (shipped digits model by default).
* :mod:`~mm_subspace.tiny_models.vision` — in-memory CLIP / open_clip / timm ViTs.
* :mod:`~mm_subspace.tiny_models.reference` — real-size configs for parameter counting on ``meta``.
* :mod:`~mm_subspace.tiny_models.photos` — scikit-image's bundled photos.

Pipelines and models loaded by path (``--pretrained_model_name_or_path``) are built once, written with
``save_pretrained`` and loaded from the cache afterwards.
"""

from __future__ import annotations

from .cache import SEED, cache_dir
from .llava import (
    TINY_LLAMA_NAME,
    TINY_LLAVA_NAME,
    TINY_LLAVA_PRETRAINED,
    tiny_llama,
    tiny_llama_path,
    tiny_llava,
    tiny_llava_path,
    tiny_llava_processor,
)
from .photos import SAMPLE_PHOTOS, cat_photos, sample_photo, write_cat_photos
from .reference import (
    clip_vit_l14_config,
    deberta_v3_base_config,
    llama2_7b_config,
    llama3_8b_config,
    roberta_base_config,
    roberta_large_config,
    sdxl_base_unet_config,
)
from .sdxl import TINY_SDXL_NAME, TINY_SDXL_SHIPPED, tiny_sdxl_components, tiny_sdxl_path, tiny_sdxl_pipeline
from .tokenizers import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    CLIP_MERGES,
    CLIP_TOKENIZER_NAME,
    CLIP_VOCAB_SIZE,
    EOS_TOKEN,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    LM_MAX_LENGTH,
    LM_TOKENIZER_NAME,
    LM_VOCAB_SIZE,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    clip_tokenizer,
    clip_tokenizer_files,
    lm_tokenizer,
)
from .vision import CLIP_MEAN, CLIP_STD, tiny_clip_model, tiny_clip_processor, tiny_clip_vision, tiny_open_clip_vit, tiny_timm_vit

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "CLIP_MEAN",
    "CLIP_MERGES",
    "CLIP_STD",
    "CLIP_TOKENIZER_NAME",
    "CLIP_VOCAB_SIZE",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "LM_MAX_LENGTH",
    "LM_TOKENIZER_NAME",
    "LM_VOCAB_SIZE",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "SAMPLE_PHOTOS",
    "SEED",
    "TINY_LLAMA_NAME",
    "TINY_LLAVA_NAME",
    "TINY_LLAVA_PRETRAINED",
    "TINY_SDXL_NAME",
    "TINY_SDXL_SHIPPED",
    "cache_dir",
    "cat_photos",
    "clip_tokenizer",
    "clip_tokenizer_files",
    "clip_vit_l14_config",
    "deberta_v3_base_config",
    "llama2_7b_config",
    "llama3_8b_config",
    "lm_tokenizer",
    "roberta_base_config",
    "roberta_large_config",
    "sample_photo",
    "sdxl_base_unet_config",
    "tiny_clip_model",
    "tiny_clip_processor",
    "tiny_clip_vision",
    "tiny_llama",
    "tiny_llama_path",
    "tiny_llava",
    "tiny_llava_path",
    "tiny_llava_processor",
    "tiny_open_clip_vit",
    "tiny_sdxl_components",
    "tiny_sdxl_path",
    "tiny_sdxl_pipeline",
    "tiny_timm_vit",
    "write_cat_photos",
]
