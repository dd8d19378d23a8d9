"""Real-size configs (``llama3_8b_config``, ``llama2_7b_config``, ``clip_vit_l14_config``,
``sdxl_base_unet_config``, ``roberta_base_config``, ``roberta_large_config``, ``deberta_v3_base_config``)
for parameter counting on ``torch.device("meta")``; they carry no weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, LlamaConfig




def llama3_8b_config() -> LlamaConfig:
    """Config of meta-llama/Meta-Llama-3-8B (8,030,261,248 parameters); for meta-device counts."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def clip_vit_l14_config() -> CLIPVisionConfig:
    """``CLIPVisionConfig`` of openai/clip-vit-large-patch14 (vision tower: 303,179,776 params)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def sdxl_base_unet_config() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json`` (2,567,463,684 parameters).

    Use with ``UNet2DConditionModel.from_config(sdxl_base_unet_config())`` under
    ``torch.device("meta")``.
    """
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": False,
        "use_linear_projection": True,
    }


def llama2_7b_config() -> LlamaConfig:
    """Config of meta-llama/Llama-2-7b-hf (6,738,415,616 parameters): the SuLoRA INSTRUCTEVAL backbone."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, hidden_act="silu",
    )


def _roberta_config(hidden: int, layers: int, heads: int) -> Any:
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=50265, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def roberta_base_config() -> Any:
    """``RobertaConfig`` of FacebookAI/roberta-base (``RobertaModel``: 124,645,632 parameters)."""
    return _roberta_config(768, 12, 12)


def roberta_large_config() -> Any:
    """``RobertaConfig`` of FacebookAI/roberta-large (``RobertaModel``: 355,359,744 parameters)."""
    return _roberta_config(1024, 24, 16)


def deberta_v3_base_config() -> Any:
    """``DebertaV2Config`` of microsoft/deberta-v3-base (``DebertaV2Model``: 183,831,552 parameters)."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0,
    )
