"""Tiny LLaMA and LLaVA (CLIP vision tower + projector + LLaMA), built once and loaded by path; the
pretrained tiny LLaVA is shipped in ``mm_subspace/weights/tiny-llava-digits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from .cache import SEED, cached, seeded
from .tokenizers import CHAT_TEMPLATE, IMAGE_TOKEN, IMAGE_TOKEN_ID, LM_MAX_LENGTH, LM_VOCAB_SIZE, PAD_TOKEN_ID, lm_tokenizer
from .vision import clip_image_processor, tiny_clip_vision_config

TINY_LLAMA_NAME = "tiny-llama-v1"


TINY_LLAVA_NAME = "tiny-llava-v1"


TINY_LLAVA_PRETRAINED = "tiny-llava-digits"  # shipped in mm_subspace/weights


def _tiny_llama_config() -> LlamaConfig:
    from transformers import LlamaConfig

    # Linear in_features are multiples of 64: bitsandbytes 4-bit on this CPU needs >= 64.
    return LlamaConfig(
        vocab_size=LM_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LM_MAX_LENGTH,
        rms_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )


def tiny_llama_path() -> Path:
    """Folder of the tiny LLaMA (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``).

    ``LlamaForCausalLM``: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, vocab
    49,472 (~6.4M parameters, mostly embeddings). Tokenizer: see ``lm_tokenizer``.
    """

    def build(folder: Path) -> None:
        from transformers import LlamaForCausalLM

        with seeded(SEED):
            model = LlamaForCausalLM(_tiny_llama_config())
        model.save_pretrained(folder)
        lm_tokenizer().save_pretrained(folder)

    return cached(TINY_LLAMA_NAME, build)


def tiny_llama(
    torch_dtype: torch.dtype | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load ``(LlamaForCausalLM, tokenizer)`` of the tiny LLaMA (built on first use)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tiny_llama_path()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def tiny_llava_processor() -> LlavaProcessor:
    """``LlavaProcessor`` of the tiny LLaVAs: 32px CLIP image processor, ``lm_tokenizer``, 16 image tokens."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=clip_image_processor(32),
        tokenizer=lm_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token; 0 gives 15 tokens for 16 features
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def tiny_llava_path(pretrained: bool = True) -> Path:
    """Folder of a tiny LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``).

    ``pretrained=True`` (default): the shipped ``tiny-llava-digits`` (``mm_subspace/weights``,
    checked against its sha256 manifest): CLIP vision 32px / patch 8 / hidden 64 / 3 layers,
    LLaMA hidden 128 / 4 layers, tied embeddings, pretrained on captions of scikit-learn's digits
    and number facts by ``training/pretrain_tiny_llava.py`` (see its manifest for data and metrics).

    ``pretrained=False``: random weights, built on first use into the cache — for structure-only
    tests. Vision CLIP 32px / patch 8 / hidden 32 / 2 layers -> 16 patch features
    (``vision_feature_layer=-2``); text = the tiny LLaMA config. In both, ``<image>`` is id 49408
    and the processor expands it to 16 tokens.
    """
    if pretrained:
        from ..shipped import shipped_path

        return shipped_path(TINY_LLAVA_PRETRAINED)

    def build(folder: Path) -> None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(
            vision_config=tiny_clip_vision_config(),
            text_config=_tiny_llama_config(),
            image_token_index=IMAGE_TOKEN_ID,
            image_seq_length=16,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        with seeded(SEED):
            model = LlavaForConditionalGeneration(config)
        model.generation_config.pad_token_id = PAD_TOKEN_ID
        model.save_pretrained(folder)
        tiny_llava_processor().save_pretrained(folder)

    return cached(TINY_LLAVA_NAME, build)


def tiny_llava(
    torch_dtype: torch.dtype | None = None, pretrained: bool = True,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load ``(LlavaForConditionalGeneration, LlavaProcessor)`` of a tiny LLaVA (see :func:`tiny_llava_path`)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = tiny_llava_path(pretrained)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype or torch.float32)
    return model, LlavaProcessor.from_pretrained(path)
