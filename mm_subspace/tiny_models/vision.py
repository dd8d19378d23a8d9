"""Tiny in-memory vision towers: transformers CLIP, open_clip and timm ViTs (real classes, random weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionConfig, CLIPVisionModel

from .cache import SEED, seeded
from .tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_vision_config() -> CLIPVisionConfig:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="quick_gelu",
    )


def clip_image_processor(size: int = 32) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def tiny_clip_vision(seed: int = SEED) -> CLIPVisionModel:
    """Seeded transformers ``CLIPVisionModel``: 32px images, patch 8, hidden 32, 2 layers."""
    from transformers import CLIPVisionModel

    with seeded(seed):
        return CLIPVisionModel(tiny_clip_vision_config())


def tiny_clip_model(seed: int = SEED) -> CLIPModel:
    """Seeded transformers ``CLIPModel`` (tiny vision tower + 2-layer text tower, projection 32).

    Text side uses the real CLIP vocabulary: pair it with ``clip_tokenizer()``
    (or ``tiny_clip_processor()``).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=32,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=tiny_clip_vision_config().to_dict(),
        projection_dim=32,
    )
    with seeded(seed):
        return CLIPModel(config)


def tiny_clip_processor() -> CLIPProcessor:
    """``CLIPProcessor`` for ``tiny_clip_model``: real CLIP tokenizer, 32px image processor."""
    from transformers import CLIPProcessor

    return CLIPProcessor(image_processor=clip_image_processor(32), tokenizer=clip_tokenizer())


def tiny_open_clip_vit(seed: int = SEED, width: int = 64) -> torch.nn.Module:
    """Seeded ``open_clip.transformer.VisionTransformer``: 32px, patch 8, 2 layers, output 32.

    No pretrained download. Attention blocks are plain ``nn.MultiheadAttention``.

    Args:
        seed: init seed.
        width: residual width (32 or 64; heads = width // 16).
    """
    from open_clip.transformer import VisionTransformer

    with seeded(seed):
        return VisionTransformer(
            image_size=32,
            patch_size=8,
            width=width,
            layers=2,
            heads=max(1, width // 16),
            mlp_ratio=4.0,
            output_dim=32,
        )


def tiny_timm_vit(seed: int = SEED, num_classes: int = 10) -> torch.nn.Module:
    """Seeded timm ``VisionTransformer``: img 32, patch 8, embed 64, depth 2, 4 heads."""
    from timm.models.vision_transformer import VisionTransformer

    with seeded(seed):
        return VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=num_classes
        )
