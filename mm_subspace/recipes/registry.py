"""The recipe registry: model families, :class:`Recipe`, :func:`register_recipe`, :func:`get_recipe`, :func:`list_recipes`."""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError


class RecipeFamilyError(ConfigError):
    """A recipe was applied to a model of another family (e.g. the LLaVA recipe on a UNet)."""


@dataclass(frozen=True)
class Family:
    """A model family a recipe is written for, recognised by its module names.

    Args:
        name: the key recipes use (``Recipe.family``).
        description: the models it means, for error messages.
        require: regexes; each must match (``re.search``) at least one module name.
        forbid: regexes no module name may match (a LLaVA is not a plain LLaMA).
    """

    name: str
    description: str
    require: tuple[str, ...]
    forbid: tuple[str, ...] = ()

    def mismatch(self, names: Sequence[str]) -> str | None:
        """Why a model with these module names is not of this family, or ``None`` if it is."""
        for pattern in self.require:
            if not any(re.search(pattern, n) for n in names):
                return f"has no module matching {pattern!r}"
        for pattern in self.forbid:
            hit = next((n for n in names if re.search(pattern, n)), None)
            if hit is not None:
                return f"has {hit!r}, which a {self.name} model does not"
        return None


_VISION = r"(^|\.)(vision_tower|visual_encoder)\."
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "transformers LLaMA (LlamaForCausalLM / LlamaModel)",
           (r"(^|\.)layers\.\d+\.self_attn\.q_proj$", r"(^|\.)layers\.\d+\.mlp\.gate_proj$"),
           (_VISION, r"multi_modal_projector")),
    Family("llava", "transformers LlavaForConditionalGeneration (LLaMA-style LM + CLIP vision tower)",
           (r"language_model\.(.*\.)?q_proj$", r"(^|\.)vision_tower\.", r"(^|\.)multi_modal_projector\.")),
    Family("internlm2_vl", "LLaVA-InternLM2 (InternLM2 LM with attention.wqkv + CLIP vision tower)",
           (r"(^|\.)attention\.wqkv$", _VISION)),
    Family("sdxl", "diffusers SDXL UNet2DConditionModel (or a pipeline holding one as .unet)",
           (r"(^|\.)down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn1\.to_q$",
            r"(^|\.)add_embedding\.linear_1$")),
    Family("roberta", "transformers RoBERTa / BERT encoder (RobertaModel, RobertaForSequenceClassification)",
           (r"(^|\.)layer\.\d+\.attention\.self\.query$",)),
    Family("deberta_v2", "transformers DeBERTa-v2 / v3 (DebertaV2Model, DebertaV2ForSequenceClassification)",
           (r"(^|\.)layer\.\d+\.attention\.self\.query_proj$",)),
    Family("timm_vit", "timm VisionTransformer (fused blocks.N.attn.qkv)", (r"(^|\.)blocks\.\d+\.attn\.qkv$",)),
)}


def _module_names(model: Any) -> tuple[str, list[str]]:
    """(class name, module names) of a model, or of a pipeline's UNet (``.unet``)."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "unet", None), nn.Module):
        return type(model).__name__, [n for n, _ in model.unet.named_modules()]
    if not isinstance(model, nn.Module):
        raise ConfigError(f"check_family needs a torch.nn.Module (or a pipeline with .unet), got {type(model).__name__}")
    return type(model).__name__, [n for n, _ in model.named_modules()]


def detect_families(model: Any) -> list[str]:
    """The families whose module names ``model`` has (usually one; ``[]`` for an unknown model)."""
    _, names = _module_names(model)
    return [f.name for f in FAMILIES.values() if f.mismatch(names) is None]


@dataclass(frozen=True)
class Recipe:
    """One paper experiment.

    Args:
        name: registry key (``get_recipe(name)``, ``--recipe name``).
        family: model family (:data:`FAMILIES`); checked by :meth:`check_family`.
        method: registry name of the method (``mm_subspace.list_methods()``).
        config: fields of the method's config, passed to ``config_for(method, **config)``.
        training: hyper-parameters keyed by the training scripts' argparse dest names
            (``learning_rate``, ``train_batch_size``, ``gradient_accumulation_steps``, ``num_train_epochs``,
            ``max_train_steps``, ``lr_scheduler``, ``lr_warmup_steps``, ``max_length``,
            ``num_validation_inference_steps``, ...): only what the paper (or code) gives.
        extra: script-level options (LLaVA: ``vision_rank``, ``vision_alpha``, ``vision_targets``,
            ``tune_projector`` in ``{"frozen", "full", "adapter"}``, ``freeze_vision_tower``, ``load_in_4bit``;
            SDXL: ``with_prior_preservation``, ``train_text_encoder``).
        cite: paper and table/section the numbers come from.
        notes: what the paper leaves open, what differs from the official code, the data.
        model: the base model the paper used (hub id or description).
        tasks: per-task overrides of ``training`` (the survey's GLUE table), see :meth:`training_for`.

    Treat the dicts as read-only; :func:`get_recipe` hands out a copy.
    """

    name: str
    family: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    cite: str = ""
    notes: str = ""
    model: str = ""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def build_config(self, **overrides: Any) -> AdapterConfig:
        """``config_for(method, **{**config, **overrides})``: the adapter config of this experiment."""
        from ..registry import get_method

        cls = get_method(self.method).config_class
        fields = {**copy.deepcopy(self.config), **overrides}
        unknown = sorted(set(fields) - cls.field_names())
        if unknown:
            raise ConfigError(f"recipe {self.name!r}: unknown field(s) {unknown} for method {self.method!r}; "
                              f"valid fields: {sorted(cls.field_names())}")
        return cls(**fields)

    def check_family(self, model: Any) -> None:
        """Raise :class:`RecipeFamilyError` naming the recipe's family and the model's class when they differ."""
        family = FAMILIES[self.family]
        cls, names = _module_names(model)
        why = family.mismatch(names)
        if why is None:
            return
        found = [f for f in FAMILIES.values() if f.mismatch(names) is None]
        looks = (f"It looks like a {found[0].name} model ({found[0].description}); recipes for it: "
                 f"{', '.join(list_recipes(found[0].name)[:8])}{' ...' if len(list_recipes(found[0].name)) > 8 else ''}."
                 if found else "It matches none of the recipe families " + ", ".join(FAMILIES) + ".")
        raise RecipeFamilyError(
            f"recipe {self.name!r} is for the {self.family} family ({family.description}), but the model is a "
            f"{cls}, which {why}. {looks} Use a recipe of the model's family, or build the config by hand "
            f"(recipe.build_config()) if the model really is a {self.family} under other module names."
        )

    def training_for(self, task: str | None = None) -> dict[str, Any]:
        """``training`` with the overrides of ``task`` (``recipe.tasks``) applied."""
        if task is None:
            return dict(self.training)
        if task not in self.tasks:
            hint = f"its tasks: {', '.join(self.tasks)}" if self.tasks else "it has no per-task settings"
            raise ConfigError(f"recipe {self.name!r} has no task {task!r}; {hint}")
        return {**self.training, **self.tasks[task]}

    def describe(self) -> str:
        """Multi-line human-readable summary (``mm-subspace recipes NAME``)."""
        lines = [f"{self.name}  [{self.family}, {self.method}]", f"  cite:     {self.cite}"]
        if self.model:
            lines.append(f"  model:    {self.model}")
        lines.append(f"  config:   {_fmt(self.config)}")
        lines.append(f"  training: {_fmt(self.training) or '(the paper gives none; script defaults)'}")
        if self.extra:
            lines.append(f"  extra:    {_fmt(self.extra)}")
        for task, values in self.tasks.items():
            lines.append(f"  task {task:6s} {_fmt(values)}")
        if self.notes:
            lines.append(f"  notes:    {self.notes}")
        return "\n".join(lines)


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


RECIPES: dict[str, Recipe] = {}
#: old names kept working (``--recipe moslora_paper`` of training/dreambooth_sdxl.py)
ALIASES: dict[str, str] = {"moslora_paper": "moslora_sdxl"}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to the registry (validated: known family and method, config builds)."""
    if recipe.family not in FAMILIES:
        raise ConfigError(f"recipe {recipe.name!r}: unknown family {recipe.family!r}; families: {', '.join(FAMILIES)}")
    if recipe.name in ALIASES:
        raise ConfigError(f"recipe name {recipe.name!r} is an alias of {ALIASES[recipe.name]!r}")
    recipe.build_config()  # unknown method or field fails at registration, not at use
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (a copy); unknown names list the recipes with a "did you mean"."""
    key = ALIASES.get(name, name)
    if key not in RECIPES:
        close = difflib.get_close_matches(str(name), [*RECIPES, *ALIASES], n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        names = [n for n in list_recipes() if not n.startswith("survey_glue_")]
        survey = len(list_recipes()) - len(names)
        raise ConfigError(
            f"unknown recipe {name!r}.{hint} Available recipes: {', '.join(names)}, and {survey} survey GLUE recipes "
            "survey_glue_<roberta_base|roberta_large|deberta_v3_base>_<method>[_r<2|4|8|16>] "
            "(all of them: mm_subspace.recipes.list_recipes(), or `mm-subspace recipes`)."
        )
    return copy.deepcopy(RECIPES[key])


def list_recipes(family: str | None = None) -> list[str]:
    """Recipe names (registration order), optionally only those of one ``family``."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    return [n for n, r in RECIPES.items() if family is None or r.family == family]
