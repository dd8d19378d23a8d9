"""Target presets: which modules each model family adapts, as data.

``inject(model, Config(targets="llama"))`` resolves a preset name here. A preset is a list of
dotted name suffixes (and optional regexes), with a docstring saying where the list comes from. A
model family is a preset, not a new code path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError, TargetError


@dataclass(frozen=True)
class Preset:
    """A named list of targets.

    Args:
        name: registry key (``targets="name"``).
        suffixes: module names matched exactly or as a dotted suffix.
        doc: where the list comes from (paper, recipe, library).
        include: optional regex a matched full name must also match (e.g. only the text model).
    """

    name: str
    suffixes: tuple[str, ...]
    doc: str
    include: str | None = None
    exclude: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def matches(self, full_name: str) -> bool:
        if not any(full_name == s or full_name.endswith("." + s) for s in self.suffixes):
            return False
        if self.include and not re.search(self.include, full_name):
            return False
        return not (self.exclude and re.search(self.exclude, full_name))

    def resolve(self, model: nn.Module) -> list[str]:
        """Full names of ``model``'s modules this preset adapts; a clear error if there are none."""
        from .inject import _candidate_modules

        names = list(_candidate_modules(model))
        found = [n for n in names if self.matches(n)]
        if not found:
            leaves = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()})
            raise TargetError(
                f"preset {self.name!r} looked for modules ending in {list(self.suffixes)}"
                f"{f' under {self.include!r}' if self.include else ''} but {type(model).__name__} has none. "
                f"Its module names end in: {', '.join(leaves[:40])}{' ...' if len(leaves) > 40 else ''}. "
                "Is this the right preset for this model family? Pass explicit targets=[...] otherwise."
            )
        return found


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str, required: bool = True) -> Preset | None:
    preset = PRESETS.get(name)
    if preset is None and required:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return preset


def list_presets() -> list[str]:
    return sorted(PRESETS)


LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")

register_preset(Preset(
    "llama", LLAMA_ATTN + LLAMA_MLP,
    "Every linear projection of a LLaMA decoder layer (attention q,k,v,o and MLP gate,up,down): the "
    "QLoRA recipe (Dettmers et al. 2023), PEFT's 'all-linear' for LLaMA minus lm_head.",
))
register_preset(Preset(
    "llama_moslora", ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    "The MoSLoRA paper's commonsense-reasoning set for LLaMA-3-8B (q,k,v,up,down; Appendix B.1, "
    "Table 4: 28.3M LoRA parameters at r=16).",
))
register_preset(Preset(
    "sdxl_unet", ("to_q", "to_k", "to_v", "to_out.0"),
    "Attention projections to_q, to_k, to_v, to_out.0 of every transformer block of the SDXL UNet: the "
    "target_modules of diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py.",
))
register_preset(Preset(
    "sdxl_text_encoders", ("q_proj", "k_proj", "v_proj", "out_proj"),
    "Self-attention q,k,v,out projections of the CLIP text encoders (diffusers' DreamBooth LoRA SDXL "
    "script with --train_text_encoder). Inject into text_encoder and text_encoder_2 separately.",
))

# -- wider SDXL, ViTs, LLaVA (issue 5) ------------------------------------------------------------------
SDXL_ATTN = ("to_q", "to_k", "to_v", "to_out.0")

register_preset(Preset(
    "sdxl_unet_wide", SDXL_ATTN + (
        "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2",
    ),
    "sdxl_unet plus, in every Transformer2DModel, the linear proj_in/proj_out (use_linear_projection=True in "
    "SDXL) and the GEGLU feed-forward ff.net.0.proj / ff.net.2, plus the timestep embedding "
    "(time_embedding.linear_1/2) and SDXL's text_time embedding (add_embedding.linear_1/2). Names are diffusers "
    "0.42 UNet2DConditionModel's (checked on the tiny SDXL UNet and on the SDXL-base config on the meta device); "
    "the set is the union of diffusers' train_text_to_image_lora_sdxl and the 'all linear' LoRA trainers "
    "(kohya-ss sd-scripts' LoRA-C3Lier minus convolutions).",
))
register_preset(Preset(
    "clip_vit", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"),
    "Vision side of transformers' CLIPVisionModel / CLIPModel: CLIPAttention q_proj, k_proj, v_proj, out_proj and "
    "CLIPMLP fc1, fc2 of every encoder layer (CLIPModel's text_model is excluded). transformers 5 names: "
    "'encoder.layers.N.self_attn.q_proj' (CLIPVisionModel has no 'vision_model.' prefix any more), "
    "'vision_model.encoder.layers.N...' in CLIPModel.",
    include=r"(^|\.)encoder\.layers\.\d+\.(self_attn|mlp)\.",
    exclude=r"(^|\.)text_model\.",
))
register_preset(Preset(
    "open_clip", ("attn", "mlp.c_fc", "mlp.c_proj"),
    "open_clip 3.x VisionTransformer / TextTransformer blocks (transformer.resblocks.N): the attention is a plain "
    "nn.MultiheadAttention whose fused in_proj_weight and out_proj are adapted as slices q, k, v, o of the MHA as a "
    "whole (wrapping out_proj alone is silently ignored by the MHA; see mm_subspace.fused), plus the MLP c_fc, "
    "c_proj. Inject into model.visual to adapt only the image tower of an open_clip CLIP. Choose slices with "
    "fused_slices={'attn': ['q', 'v']}.",
    include=r"(^|\.)resblocks\.\d+\.",
))
register_preset(Preset(
    "timm_vit", ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "timm 1.0 VisionTransformer blocks (blocks.N): Attention.qkv — one fused Linear (out = 3·dim), adapted as "
    "three slices q, k, v with their own adapters (fused_slices={'attn.qkv': ['q', 'k', 'v']} by default) — "
    "Attention.proj, and Mlp.fc1, fc2. Same modules as clip_vit, in timm's layout.",
    include=r"(^|\.)blocks\.\d+\.",
    extra={"fused_slices": {r"attn\.qkv": ["q", "k", "v"]}},
))

LLAVA_LM = r"language_model\.(.*\.)?(q|k|v|o|gate|up|down)_proj"
LLAVA_VISION = r"vision_tower\.(.*\.)?self_attn\.(q|k|v|out)_proj"
LLAVA_PROJECTOR = r"multi_modal_projector\.linear_[12]"
LLAVA_SUFFIXES = LLAMA_ATTN + LLAMA_MLP + ("out_proj", "linear_1", "linear_2")

register_preset(Preset(
    "llava", LLAVA_SUFFIXES,
    "LLaVA (transformers LlavaForConditionalGeneration): the language model's q,k,v,o,gate,up,down projections "
    "(model.language_model.layers.N...), the CLIP vision tower's attention q,k,v,out_proj "
    "(model.vision_tower.encoder.layers.N.self_attn...) and the multimodal projector linear_1/linear_2 — the MoSLoRA "
    "paper's visual-instruction-tuning set (§4.2, Table 8: LLM q,k,v,o,up,down,gate + ViT). Give the vision tower "
    "and projector their own rank/alpha with rank_pattern/alpha_pattern, or build the config with "
    "presets.llava_config(...) (paper: LLM r=64 α=128, vision r=64 α=16).",
    include=rf"({LLAVA_LM}|{LLAVA_VISION}|{LLAVA_PROJECTOR})$",
))
register_preset(Preset(
    "llava_no_projector", LLAMA_ATTN + LLAMA_MLP + ("out_proj",),
    "The llava preset without the multimodal projector: for training the projector fully "
    "(trainable_modules=['multi_modal_projector'], as llava_config(projector='train') sets) or keeping it frozen.",
    include=rf"({LLAVA_LM}|{LLAVA_VISION})$",
))

PROJECTOR_MODES = ("adapt", "train", "freeze")


def llava_config(
    method: str = "moslora",
    llm_rank: int = 64,
    llm_alpha: float = 128.0,
    vision_rank: int = 64,
    vision_alpha: float = 16.0,
    projector: str = "adapt",
    projector_rank: int | None = None,
    projector_alpha: float | None = None,
    **kwargs,
):
    """Config of ``method`` for a LLaVA with separate LLM / vision / projector rank and alpha.

    Defaults are the MoSLoRA paper's LLaMA3+ViT recipe (Table 8: r 64/64, α 128/16). For its
    InternLM2 QLoRA recipe pass ``llm_rank=512, llm_alpha=256``.

    Args:
        projector: ``"adapt"`` (adapters on linear_1/linear_2, rank/alpha = ``projector_rank``/
            ``projector_alpha``, default the vision ones), ``"train"`` (trained fully and saved with the
            adapter, like PEFT's ``modules_to_save``) or ``"freeze"``.
        kwargs: other fields of the method's config (``dropout``, ``mixer_init``, ...).
    """
    from .registry import get_method

    if projector not in PROJECTOR_MODES:
        raise ConfigError(f"projector must be one of {PROJECTOR_MODES}, got {projector!r}")
    rank_pattern = {r"vision_tower\..*": vision_rank, **kwargs.pop("rank_pattern", {})}
    alpha_pattern = {r"vision_tower\..*": vision_alpha, **kwargs.pop("alpha_pattern", {})}
    trainable = list(kwargs.pop("trainable_modules", []))
    if projector == "adapt":
        rank_pattern[r"multi_modal_projector\..*"] = projector_rank or vision_rank
        alpha_pattern[r"multi_modal_projector\..*"] = projector_alpha if projector_alpha is not None else vision_alpha
    elif projector == "train":
        trainable.append("multi_modal_projector")
    return get_method(method).config_class(
        rank=llm_rank,
        alpha=llm_alpha,
        targets="llava" if projector == "adapt" else "llava_no_projector",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        trainable_modules=trainable,
        **kwargs,
    )


def with_preset_defaults(config):
    """``config`` with the defaults its preset brings (``Preset.extra``), for fields left at their default.

    Dict fields are merged (the user's keys win). Used by :func:`mm_subspace.inject`, so the stored and
    saved config holds the values actually used (e.g. timm_vit's ``fused_slices``).
    """
    import dataclasses

    preset = get_preset(config.targets, required=False) if isinstance(config.targets, str) else None
    if preset is None or not preset.extra:
        return config
    defaults = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in preset.extra.items():
        current = getattr(config, key)
        if isinstance(value, dict):
            merged = {**current, **{k: v for k, v in value.items() if k not in current}}  # user's keys match first
            if merged != current:
                changes[key] = merged
        elif defaults[key].default is not dataclasses.MISSING and current == defaults[key].default:
            changes[key] = value
    return config.replace(**changes) if changes else config
