"""Tiny SDXL (``tiny_sdxl_path``): VAE scale factor 4 (three VAE blocks), UNet ``sample_size`` 8, so the
pipeline's default image is 32x32 with 8x8 latents. By default it is the shipped model pretrained on
handwritten digits (``mm_subspace/weights/tiny-sdxl-digits``, see ``training/pretrain_tiny_sdxl.py``);
``pretrained=False`` gives random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

from .cache import SEED, cached, seeded
from .tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer

TINY_SDXL_NAME = "tiny-sdxl-v2"  # v2: 32 px images, VAE factor 4 (8x8 latents)


#: the shipped pretrained tiny SDXL (``mm_subspace/weights/tiny-sdxl-digits``)
TINY_SDXL_SHIPPED = "tiny-sdxl-digits"


def tiny_sdxl_components() -> dict[str, Any]:
    """Seeded components of the tiny SDXL pipeline (see the module docstring)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    addition_time_embed_dim = 8
    text_hidden, projection_dim = 32, 32
    with seeded(SEED):
        unet = UNet2DConditionModel(
            sample_size=8,  # latents; x vae scale factor 4 -> 32x32 images (the 8x8 digits, upscaled)
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL-like order
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1,
            attention_head_dim=(2, 4),  # heads of 16 channels, as SDXL's 64-channel heads
            use_linear_projection=True,
            cross_attention_dim=text_hidden + text_hidden,  # concat of both encoders
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # pooled text_encoder_2 output + 6 micro-conditioning numbers
            projection_class_embeddings_input_dim=projection_dim + 6 * addition_time_embed_dim,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),  # three blocks -> vae scale factor 4
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=32,
            scaling_factor=0.13025,  # SDXL's; pretraining sets 1 / std of its latents
        )
        common = dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=text_hidden,
            intermediate_size=64,
            num_hidden_layers=2,  # SDXL reads hidden_states[-2]
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=projection_dim,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    tokenizer = clip_tokenizer()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
    )


def tiny_sdxl_path(pretrained: bool = True) -> Path:
    """Folder of the tiny SDXL pipeline (``StableDiffusionXLPipeline.from_pretrained`` loads it).

    Same layout as stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text_encoder,
    text_encoder_2, tokenizer, tokenizer_2, scheduler). VAE scale factor 4, UNet sample size 8:
    default images are 32x32.

    Args:
        pretrained: ``True`` (default): the shipped ``tiny-sdxl-digits`` model, pretrained on the
            handwritten digits 0-8 by ``training/pretrain_tiny_sdxl.py`` (fp16 safetensors in
            ``mm_subspace/weights``; every file checked against its manifest first, a wrong file
            raises :class:`~mm_subspace.errors.ShippedModelError`). ``False``: the same
            architecture with seeded random weights, built once into :func:`cache_dir` (for tests
            that only need structure).
    """
    if pretrained:
        from ..shipped import shipped_path

        return shipped_path(TINY_SDXL_SHIPPED)

    def build(folder: Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        components = tiny_sdxl_components()
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(folder)

    return cached(TINY_SDXL_NAME, build)


def tiny_sdxl_pipeline(
    torch_dtype: torch.dtype | None = None, pretrained: bool = True
) -> StableDiffusionXLPipeline:
    """Load the tiny SDXL pipeline in ``torch_dtype`` (default float32); see :func:`tiny_sdxl_path`.

    ``pretrained=True`` (default): the shipped digits model (prompts such as "a handwritten digit
    seven", 32x32 images). ``pretrained=False``: random weights, same architecture.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_path(pretrained), dtype=torch_dtype or torch.float32, local_files_only=True
    )
