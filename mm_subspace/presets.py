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
from .targets import candidate_modules


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
        names = list(candidate_modules(model))
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

# -- wider SDXL, ViTs, LLaVA ------------------------------------------------------------------
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
LLAVA_VISION = r"vision_tower\.(.*\.)?(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
LLAVA_PROJECTOR = r"multi_modal_projector\.linear_[12]"
#: the same module sets as full-match ``targets`` regexes (configs built piece by piece: the training script, demos)
LLAVA_LM_TARGETS = rf".*{LLAVA_LM}"
LLAVA_VISION_TARGETS = rf".*{LLAVA_VISION}"
LLAVA_PROJECTOR_TARGETS = rf".*{LLAVA_PROJECTOR}"
VIT_LINEARS = ("out_proj", "fc1", "fc2")
LLAVA_SUFFIXES = LLAMA_ATTN + LLAMA_MLP + VIT_LINEARS

# The MoSLoRA paper (§4.2) keeps XTuner's pretrained projector and its XTuner configs adapt every ViT linear
# (find_all_linear_names: q,k,v,out_proj and mlp.fc1/fc2), so ``llava`` is that set.
register_preset(Preset(
    "llava", LLAVA_SUFFIXES,
    "LLaVA (transformers LlavaForConditionalGeneration) as in the MoSLoRA paper (§4.2, Table 8, App. B.2): the "
    "language model's q,k,v,o,gate,up,down projections (model.language_model.layers.N...) and every linear of the "
    "CLIP vision tower — attention q,k,v,out_proj and MLP fc1, fc2 (model.vision_tower.encoder.layers.N...), which is "
    "what the official XTuner configs adapt (no target_modules: XTuner's find_all_linear_names). The multimodal "
    "projector is not adapted: the paper starts from XTuner's pretrained projector (freeze it, or train it fully with "
    "trainable_modules=['multi_modal_projector'] as XTuner's LLaVAModel does). Give the vision tower its own "
    "rank/alpha with presets.llava_config(...) (paper: LLM r=64 α=128, vision r=64 α=16) or the recipe "
    "mm_subspace.recipes.get_recipe('moslora_vi_llama3').",
    include=rf"({LLAVA_LM}|{LLAVA_VISION})$",
))
register_preset(Preset(
    "llava_projector", LLAVA_SUFFIXES + ("linear_1", "linear_2"),
    "llava plus LoRA-style adapters on the multimodal projector linear_1/linear_2 (llava_config(projector='adapt')). "
    "Not the paper's setting (it keeps the pretrained projector).",
    include=rf"({LLAVA_LM}|{LLAVA_VISION}|{LLAVA_PROJECTOR})$",
))

PROJECTOR_MODES = ("adapt", "train", "freeze")
#: the visual-instruction script's ``--tune_projector`` words for the same modes (documented, kept working)
PROJECTOR_MODE_WORDS = {"adapter": "adapt", "full": "train", "frozen": "freeze"}


def projector_mode(word: str) -> str:
    """The projector mode (one of :data:`PROJECTOR_MODES`) that ``word`` names; the script's words are synonyms."""
    mode = PROJECTOR_MODE_WORDS.get(word, word)
    if mode not in PROJECTOR_MODES:
        raise ConfigError(f"projector must be one of {PROJECTOR_MODES} (or {tuple(PROJECTOR_MODE_WORDS)}), got {word!r}")
    return mode


def llava_config(
    method: str = "moslora",
    llm_rank: int = 64,
    llm_alpha: float = 128.0,
    vision_rank: int = 64,
    vision_alpha: float = 16.0,
    projector: str = "freeze",
    projector_rank: int | None = None,
    projector_alpha: float | None = None,
    **kwargs,
):
    """Config of ``method`` for a LLaVA with separate LLM / vision / projector rank and alpha.

    Defaults are the MoSLoRA paper's LLaMA3+ViT recipe (Table 8: r 64/64, α 128/16; projector kept as
    pretrained, §4.2). Its InternLM2 recipe has other module names: use the ``internlm2_vl`` preset /
    the ``qmoslora_vi_internlm2`` recipe (:mod:`mm_subspace.recipes`).

    Args:
        projector: ``"freeze"`` (default; the paper text keeps XTuner's pretrained projector),
            ``"train"`` (trained fully and saved with the adapter, like PEFT's ``modules_to_save``; what
            XTuner's ``LLaVAModel`` does in the official configs) or ``"adapt"`` (adapters on
            linear_1/linear_2, rank/alpha = ``projector_rank``/``projector_alpha``, default the vision ones).
        kwargs: other fields of the method's config (``dropout``, ``mixer_init``, ...).
    """
    from .registry import get_method

    projector = projector_mode(projector)
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
        targets="llava_projector" if projector == "adapt" else "llava",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        trainable_modules=trainable,
        **kwargs,
    )


# -- InternLM2 ----------------------------------------------------------------------------
# InternLM2 (internlm/internlm2-chat-7b, HF remote code) names: model.layers.N.attention.wqkv / .wo and
# model.layers.N.feed_forward.w1 / w2 / w3 (w1 = gate, w3 = up, w2 = down). wqkv is fused in a grouped-query
# layout — per key/value head, [q heads of the group; k; v] interleaved — not the [Q; K; V] thirds that
# mm_subspace.fused splits, so it is adapted as one matrix, exactly as PEFT and the official XTuner configs do.
INTERNLM2_LM = r"(^|\.)layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])"
VISION_TOWER_ANY = r"(vision_tower|visual_encoder)\.(.*\.)?(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
register_preset(Preset(
    "internlm2", ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "Every linear of an InternLM2 decoder layer: the fused attention.wqkv (grouped-query layout, adapted whole) and "
    "attention.wo, the SwiGLU feed_forward.w1/w3 (gate/up) and w2 (down) — the QLoRA 'all linear' set that XTuner's "
    "find_all_linear_names gives (output, the LM head, excluded).",
    include=rf"{INTERNLM2_LM}$",
))
register_preset(Preset(
    "internlm2_vl", ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    + VIT_LINEARS + ("q_proj", "k_proj", "v_proj"),
    "LLaVA-InternLM2 as in the MoSLoRA paper's QMoSLoRA recipe (§4.2, Table 8, App. B.2): the internlm2 preset on "
    "the language model plus every linear of the CLIP vision tower (self_attn q,k,v,out_proj, mlp fc1/fc2; under "
    "vision_tower. or XTuner's visual_encoder.). The projector is not adapted. InternLM2 is remote code (not in "
    "transformers), so the preset is tested on a stand-in module tree with its real attribute names.",
    include=rf"({INTERNLM2_LM}|{VISION_TOWER_ANY})$",
))

# -- q,v-only and encoder presets for the SuLoRA and survey recipes --------------------------
register_preset(Preset(
    "llama_qv", ("q_proj", "v_proj"),
    "W_Q and W_V of every LLaMA attention layer — the SuLoRA paper's choice in all its experiments (§4.3, after "
    "AdaLoRA): INSTRUCTEVAL on LLaMA-2-7B. Table 3's LoRA 33.6M = r 64 on q,v of LLaMA-2-7B (tested).",
    exclude=r"(^|\.)vision_tower\.",
))
register_preset(Preset(
    "llava_qv", ("q_proj", "v_proj"),
    "W_Q and W_V of the LLaVA language model only (SuLoRA §4.3, multimodal tasks on LLaVA); vision tower and "
    "projector untouched.",
    include=r"language_model\.(.*\.)?(q|v)_proj$",
))
register_preset(Preset(
    "timm_vit_qv", ("attn.qkv",),
    "The q and v slices of timm VisionTransformer's fused attn.qkv (one adapter per slice, k untouched): SuLoRA's "
    "DomainBed setting (W_Q and W_V of an ImageNet ViT, §4.3).",
    include=r"(^|\.)blocks\.\d+\.",
    extra={"fused_slices": {r"attn\.qkv": ["q", "v"]}},
))
_ENCODER_LAYER = r"(^|\.)layer\.\d+\."
register_preset(Preset(
    "roberta_qv", ("attention.self.query", "attention.self.value"),
    "W_Q and W_V of every RoBERTa/BERT encoder layer (attention.self.query / .value): SuLoRA's GLUE setting (§4.3) "
    "and LoRA's (Hu et al. §7.1).",
    include=_ENCODER_LAYER,
))
register_preset(Preset(
    "roberta", ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"),
    "Every linear of a RoBERTa/BERT encoder layer: query, key, value, attention.output.dense, intermediate.dense "
    "(FFN in) and output.dense (FFN out); the pooler and classifier head are excluded. The subspace-tuning survey's "
    "'all linear layers' for LoRA/DoRA/FLoRA/TriLoRA/adapters on GLUE (Implementation Details; Supplementary "
    "Tables 2 and 4).",
    include=_ENCODER_LAYER,
))
register_preset(Preset(
    "roberta_ia3", ("attention.self.key", "attention.self.value", "output.dense"),
    "(IA)³'s placement on RoBERTa (Liu et al. 2022 §3.3; survey Implementation Details): keys, values and the FFN's "
    "intermediate activation — the input of the FFN's second layer output.dense, so use it with "
    "IA3Config(feedforward=['output.dense']). attention.output.dense is excluded.",
    include=r"(^|\.)layer\.\d+\.(attention\.self\.(key|value)|output\.dense)$",
))
register_preset(Preset(
    "roberta_kvi", ("attention.self.key", "attention.self.value", "intermediate.dense"),
    "SSL/SSB on RoBERTa as in the survey (keys, values and the FFN intermediate, 'along with (IA)³'): key, value and "
    "intermediate.dense, whose output is the intermediate activation. This reading reproduces the survey's counts "
    "(RoBERTa-base: SSL 0.22‰, SSB 0.66‰; Supplementary Table 2, tested).",
    include=_ENCODER_LAYER,
))
register_preset(Preset(
    "deberta_v2_qv", ("attention.self.query_proj", "attention.self.value_proj"),
    "W_Q and W_V of every DeBERTa-v2/v3 layer (attention.self.query_proj / value_proj).",
    include=_ENCODER_LAYER,
))
register_preset(Preset(
    "deberta_v2", ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                   "attention.output.dense", "intermediate.dense", "output.dense"),
    "Every linear of a DeBERTa-v2/v3 layer (query_proj, key_proj, value_proj, attention.output.dense, "
    "intermediate.dense, output.dense); pooler and classifier excluded. The survey's 'all linear layers' on "
    "DeBERTaV3-base (Supplementary Table 3).",
    include=_ENCODER_LAYER,
))
register_preset(Preset(
    "deberta_v2_ia3", ("attention.self.key_proj", "attention.self.value_proj", "output.dense"),
    "(IA)³ on DeBERTa-v2/v3: key_proj, value_proj and the FFN's second layer output.dense (use feedforward="
    "['output.dense']); see roberta_ia3.",
    include=r"(^|\.)layer\.\d+\.(attention\.self\.(key|value)_proj|output\.dense)$",
))
register_preset(Preset(
    "deberta_v2_kvi", ("attention.self.key_proj", "attention.self.value_proj", "intermediate.dense"),
    "SSL/SSB on DeBERTa-v2/v3 as in the survey: key_proj, value_proj, intermediate.dense (see roberta_kvi; "
    "DeBERTaV3-base: SSL 0.15‰, SSB 0.45‰, Supplementary Table 3, tested).",
    include=_ENCODER_LAYER,
))


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


def parse_targets(spec: str) -> str | list[str]:
    """A command-line targets value: a preset name stays a string (:func:`list_presets`); ``"to_q,to_v"`` becomes a
    list of module names or suffixes."""
    if spec in PRESETS:
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"empty target list {spec!r}; presets: {', '.join(list_presets())}")
    return names
