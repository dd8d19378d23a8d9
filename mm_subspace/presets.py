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
