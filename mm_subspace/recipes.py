"""Paper recipes: one name sets up one experiment of the MoSLoRA, SuLoRA and subspace-tuning-survey papers.

A :class:`Recipe` holds what a paper gives for one experiment — the method, its config fields
(targets, rank, alpha, dropout, mixer init, N, ...), the training hyper-parameters (learning rate,
batch, accumulation, epochs, schedule) and script-level options — with the table or section each
number comes from. ::

    from mm_subspace import recipes
    recipe = recipes.get_recipe("moslora_commonsense")
    recipe.check_family(model)                 # a LLaVA recipe on a UNet fails here, naming both
    mms.inject(model, recipe.build_config())   # MoSLoRA r=16 α=32 dropout 0.05 on q,k,v,up,down
    recipe.training                            # {'learning_rate': 3e-05, 'train_batch_size': 16, ...}

Training scripts take ``--recipe NAME`` and call :func:`apply_recipe_to_args` right after
``parse_args``: every value the user did not pass explicitly is set from the recipe. ``mm-subspace
recipes`` lists them all (``mm-subspace recipes NAME`` describes one).

Where a paper and its official code disagree, both are recipes: the plain name follows the paper,
``<name>_official`` the code (e.g. MoSLoRA commonsense: Table 7 says lr 3e-5, ``train_moslora.sh``
runs 3e-4). Values the papers do not give are left out of ``training`` (the script's defaults
apply) or, for config fields that need a value (alpha), chosen neutrally and said so in ``notes``.

Names: ``moslora_*`` / ``qmoslora_*`` / ``lora_*`` / ``dora_*`` / ``ts_mixing_*`` (MoSLoRA paper),
``sulora_*`` (SuLoRA paper), and the survey's GLUE grid ``survey_glue_<model>_<method>[_r<rank>]``
with ``<model>`` in ``roberta_base``, ``roberta_large``, ``deberta_v3_base``, ``<method>`` one of
:data:`SURVEY_RANK_METHODS` (with a rank 2/4/8/16) or :data:`SURVEY_FIXED_METHODS` (no rank), e.g.
``survey_glue_roberta_base_lora_mpc_o_r8``, ``survey_glue_deberta_v3_base_ssb``. Their per-task
learning rate and epochs (Supplementary Table 6) are ``recipe.tasks``; pick one with
``recipe.training_for("rte")`` or ``apply_recipe_to_args(..., task="rte")``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from .config import AdapterConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "Family",
    "Recipe",
    "RecipeFamilyError",
    "apply_recipe_to_args",
    "explicit_dests",
    "get_recipe",
    "list_recipes",
    "register_recipe",
]


class RecipeFamilyError(ConfigError):
    """A recipe was applied to a model of another family (e.g. the LLaVA recipe on a UNet)."""


# ------------------------------------------------------------------------------------------ families
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


# ------------------------------------------------------------------------------------------- recipes
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
        from .registry import get_method

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


# ---------------------------------------------------------------------------- training-script glue
#: config field -> argparse dests it may have in a training script (first one present wins)
CONFIG_FLAGS: dict[str, tuple[str, ...]] = {
    "rank": ("rank", "lora_rank", "lora_r"),
    "alpha": ("alpha", "lora_alpha"),
    "dropout": ("lora_dropout", "dropout"),
    "targets": ("target_preset", "targets", "target_modules"),
}
#: recipe key -> dest names used for it by the scripts (new names first)
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_validation_inference_steps": ("num_validation_inference_steps", "validation_inference_steps"),
    "max_length": ("max_length", "max_seq_length", "cutoff_len", "model_max_length"),
}
METHOD_DESTS = ("adapter", "method")


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> set[str]:
    """Destinations of the options present in ``argv`` (default ``sys.argv[1:]``), whatever their value."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            elif action.nargs is not None:
                kwargs["nargs"] = action.nargs
            quiet.add_argument(*action.option_strings, **kwargs)
    known, _ = quiet.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return set(vars(known))


def _dest(key: str, dests: dict[str, argparse.Action], table: dict[str, tuple[str, ...]]) -> str | None:
    return next((d for d in table.get(key, (key,)) if d in dests), None)


def _as_flag_value(key: str, value: Any, action: argparse.Action) -> Any:
    if isinstance(value, (list, tuple)) and action.nargs is None:
        value = ",".join(map(str, value))  # e.g. targets -> --target_preset "q_proj,v_proj"
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"recipe value {key}={value!r} is not one of --{action.dest}'s choices {list(action.choices)}")
    return value


def apply_recipe_to_args(
    recipe: Recipe | str,
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """Set ``recipe``'s values on ``args`` wherever the user did not pass the flag; returns ``{dest: value}`` set.

    Call right after ``args = parser.parse_args(argv)`` with the same ``argv`` (``None`` = ``sys.argv[1:]``).
    Explicit flags are detected from ``argv``, so ``--learning_rate 1e-4`` wins even when it equals the default.

    * ``recipe.method`` goes to ``--adapter`` (or ``--method``); config fields to their flags through
      :data:`CONFIG_FLAGS` (``rank``, ``alpha``, ``lora_dropout``, ``target_preset`` ...) or a flag of the same
      name (``mixer_init``, ``num_subspaces``). Fields the chosen method does not have are skipped (``--adapter
      lora`` with a MoSLoRA recipe drops ``mixer_init``); fields the script has no flag for (``rank_pattern``)
      are logged — build the config with ``recipe.build_config()`` to keep them.
    * ``training`` (with ``tasks[task]``) and ``extra`` keys must be flags of the script (aliases:
      :data:`FLAG_ALIASES`); an unknown key is a :class:`ConfigError` raised before anything is set.
    * The recipe's batch is the effective one: when the user sets ``--train_batch_size`` but not
      ``--gradient_accumulation_steps``, accumulation becomes ``recipe batch × accumulation // user batch``.
      Likewise its scale: ``--rank`` without ``--alpha`` sets alpha to keep the recipe's ``alpha / rank``.
    """
    from .registry import get_method

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    dests = {a.dest: a for a in parser._actions if a.option_strings}
    explicit = explicit_dests(parser, argv)
    values = {**recipe.training_for(task), **recipe.extra}
    unknown = [k for k in values if _dest(k, dests, FLAG_ALIASES) is None]
    if unknown:
        raise ConfigError(
            f"recipe {recipe.name!r} sets {', '.join(unknown)}, which {parser.prog} has no flag for; "
            f"its flags: {', '.join('--' + d for d in sorted(dests))}. Use a recipe made for this script "
            f"(family {recipe.family!r}), or apply it by hand from recipe.training / recipe.extra."
        )
    # plan every assignment first, so a bad value (not one of a flag's choices) also fails before any change
    plan: dict[str, Any] = {}

    def put(dest: str, value: Any, key: str) -> None:
        if dest in explicit:
            logger.info("recipe %s: keeping --%s=%r given explicitly (recipe: %r)", recipe.name, dest, getattr(args, dest), value)
        else:
            plan[dest] = _as_flag_value(key, value, dests[dest])

    method_dest = next((d for d in METHOD_DESTS if d in dests), None)
    if method_dest is not None:
        put(method_dest, recipe.method, "method")
    method = plan.get(method_dest, getattr(args, method_dest)) if method_dest is not None else recipe.method
    fields = get_method(method).config_class.field_names()
    skipped = []
    for key, value in recipe.config.items():
        dest = _dest(key, dests, CONFIG_FLAGS)
        if key not in fields:
            logger.info("recipe %s: %s=%r does not apply to method %s; skipped", recipe.name, key, value, method)
        elif dest is None:
            skipped.append(key)
        else:
            put(dest, value, key)
    if skipped:
        logger.info("recipe %s: %s not flags of %s; build the config with recipe.build_config() to use them",
                    recipe.name, ", ".join(skipped), parser.prog)
    for key, value in values.items():
        put(_dest(key, dests, FLAG_ALIASES), value, key)
    for dest, value in plan.items():
        setattr(args, dest, value)
    applied = dict(plan)
    rank_dest, alpha_dest = _dest("rank", dests, CONFIG_FLAGS), _dest("alpha", dests, CONFIG_FLAGS)
    if ("rank" in recipe.config and "alpha" in recipe.config and rank_dest in explicit and alpha_dest in applied
            and getattr(args, rank_dest)):
        # keep the recipe's scale alpha/r when only the rank is changed (diffusers: lora_alpha = rank)
        args.__dict__[alpha_dest] = float(recipe.config["alpha"]) * getattr(args, rank_dest) / recipe.config["rank"]
        applied[alpha_dest] = getattr(args, alpha_dest)
    batch, accum = recipe.training.get("train_batch_size"), recipe.training.get("gradient_accumulation_steps", 1)
    if (batch and "train_batch_size" in explicit and "gradient_accumulation_steps" in dests
            and "gradient_accumulation_steps" not in explicit):
        args.gradient_accumulation_steps = max(1, batch * accum // args.train_batch_size)
        applied["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    for dest, value in applied.items():
        logger.info("recipe %s: --%s=%r", recipe.name, dest, value)
    return applied


# ============================================================================== the recipes themselves
# -- MoSLoRA (Wu et al. 2024) ------------------------------------------------------------------------------
_COMMONSENSE = dict(rank=16, alpha=32, dropout=0.05, targets="llama_moslora")
_COMMONSENSE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct (§4.1: the instruction version)"
_COMMONSENSE_DATA = ("Data: the 170k commonsense training mixture of LLM-Adapters (Hu et al. 2023), evaluated "
                     "on ARC-e/c, OBQA, SIQA, WinoGrande, PIQA, BoolQ, HellaSwag.")
register_recipe(Recipe(
    "moslora_commonsense", "llama", "moslora",
    {**_COMMONSENSE, "mixer_init": "kaiming_uniform"},
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA App. B.1, Table 7 (hyper-parameters); Tables 3-4 (Kaiming mixer, 85.6 avg; 28.4M params)",
    notes="The paper's numbers: lr 3e-5 (Table 7). The official train_moslora.sh runs lr 3e-4 with micro-batch 4 "
          "and cutoff 256: that is moslora_commonsense_official. Table 3's other inits: override mixer_init "
          "('orthogonal' 84.4, 'identity' 82.6, 'normal_unit' 80.7 — the paper gives no std; the official code's "
          "commented-out nn.init.normal_ is std 1). " + _COMMONSENSE_DATA,
    model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "moslora_commonsense_official", "llama", "moslora",
    {**_COMMONSENSE, "mixer_init": "kaiming_uniform"},
    {"learning_rate": 3e-4, "train_batch_size": 4, "gradient_accumulation_steps": 4, "num_train_epochs": 3,
     "max_length": 256},
    cite="official MoSLoRA code, commonsense_reasoning/train_moslora.sh (batch 16 = micro-batch 4 × 4)",
    notes="What the released script runs, which differs from the paper's Table 7 lr 3e-5 (moslora_commonsense): "
          "lr 3e-4, micro-batch 4, cutoff_len 256, val_set_size 120. " + _COMMONSENSE_DATA,
    model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "lora_commonsense", "llama", "lora", dict(_COMMONSENSE),
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA Table 7, Table 4 (LoRA baseline: 28.3M params, 82.8 avg)",
    notes="The LoRA column of Table 7. " + _COMMONSENSE_DATA, model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "ts_mixing_commonsense", "llama", "ts_mixing", dict(_COMMONSENSE),
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA §2.2, Table 1 (two-subspaces-mixing LoRA at r=16; 'all hyper-parameters are the same' = App. B.1)",
    notes="Table 1 also reports r=8: override rank=8, alpha=16. " + _COMMONSENSE_DATA, model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "dora_commonsense", "llama", "dora", dict(_COMMONSENSE),
    {"learning_rate": 3e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA Table 7 (DoRA column, r=16), Table 4 (DoRA 29.1M params, 85.0 avg)",
    notes=_COMMONSENSE_DATA, model=_COMMONSENSE_MODEL,
))
register_recipe(Recipe(
    "dora_commonsense_baseline", "llama", "dora", {**_COMMONSENSE, "rank": 32, "alpha": 64},
    {"learning_rate": 1e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 3},
    cite="MoSLoRA Table 7 (last column, DoRA† with the larger rank), Table 4 (DoRA† 57.4M params, 85.2 avg)",
    notes="Table 7's rank (16 | 32), alpha (32 | 64) and learning rate (3e-5 | 1e-5) rows each have two values; "
          "we read the second value as the last column's (DoRA†), as for rank and alpha — the table's layout does "
          "not say so explicitly. " + _COMMONSENSE_DATA,
    model=_COMMONSENSE_MODEL,
))

_VI_LLAMA3_MODEL = ("LLaVA with meta-llama/Meta-Llama-3-8B-Instruct, openai/clip-vit-large-patch14-336 and XTuner's "
                    "pretrained projector (llava_llama3_8b_instruct_clip_vit_large_p14_336 pretrain stage)")
_VI_DATA = "Data: LLaVA-v1.5 mix665k instruction data; evaluation with VLMEvalKit (Table 5)."
#: rank_pattern/alpha_pattern key of the vision tower (transformers' vision_tower., XTuner's visual_encoder.)
VISION_PATTERN = r"(vision_tower|visual_encoder)\..*"
_VI_CONFIG = dict(
    rank=64, alpha=128, dropout=0.05, targets="llava", mixer_init="kaiming_uniform",
    rank_pattern={VISION_PATTERN: 64}, alpha_pattern={VISION_PATTERN: 16.0},
)
_VI_EXTRA = dict(vision_rank=64, vision_alpha=16.0, vision_targets="clip_vit", freeze_vision_tower=False,
                 load_in_4bit=False)
def _visual_instruction(name: str, family: str, config: dict[str, Any], paper: dict[str, Any], official_lr: float,
                        extra: dict[str, Any], cite: str, notes: str, official_cite: str, official_notes: str,
                        model: str) -> None:
    """Register ``name`` (the paper's Table 8 values, projector frozen) and ``name_official`` (the XTuner config)."""
    register_recipe(Recipe(name, family, "moslora", copy.deepcopy(config), dict(paper),
                           {**_VI_EXTRA, **extra, "tune_projector": "frozen"}, cite=cite, notes=notes + " " + _VI_DATA,
                           model=model))
    register_recipe(Recipe(f"{name}_official", family, "moslora", copy.deepcopy(config),
                           {**paper, "learning_rate": official_lr, "lr_scheduler": "cosine", "max_length": 1472},
                           {**_VI_EXTRA, **extra, "tune_projector": "full"},
                           cite="official MoSLoRA code, visual_instruction_tuning/" + official_cite,
                           notes=official_notes + " " + _XTUNER + " " + _VI_DATA, model=model))


_XTUNER = ("XTuner run: AdamW, weight decay 0, grad-clip 1, fp16 AMP; LinearLR warm-up over the first 3% of the "
           "epoch, then cosine to 0 (set --lr_warmup_steps to 3% of the steps); max_length = 2048 − 576 image tokens; "
           "the projector trained fully from XTuner's pretrained one (XTuner's LLaVAModel never freezes it); 4 GPUs.")
_visual_instruction(
    "moslora_vi_llama3", "llava", _VI_CONFIG,
    {"learning_rate": 2e-5, "train_batch_size": 8, "gradient_accumulation_steps": 2, "num_train_epochs": 1}, 2e-5, {},
    cite="MoSLoRA §4.2, Table 8 (LLaMA-3+ViT column), App. B.2; Table 5 (57.1 avg Kaiming, 57.3 orthogonal)",
    notes="LLM q,k,v,o,gate,up,down r=64 α=128; every ViT linear (attention and MLP fc1/fc2, as the official XTuner "
          "config's find_all_linear_names) r=64 α=16; the pretrained projector kept (§4.2). Table 5's 'Orth' row: "
          "override mixer_init='orthogonal'. Dropout 0.05 is the official config's (Table 8 gives none). The "
          "official XTuner run differs (projector trained fully, cosine schedule): moslora_vi_llama3_official.",
    official_cite="kaiming_mix_lora_llava_llama3_8b_instruct_clip_vit_large_p14_336_lora_e1_gpu4_finetune.py",
    official_notes="Per-device batch 8 × accumulation 2 (global 64), lr 2e-5 as in Table 8.",
    model=_VI_LLAMA3_MODEL,
)
_VI_INTERNLM2_MODEL = ("LLaVA with internlm/internlm2-chat-7b (4-bit NF4, double quantisation), "
                       "openai/clip-vit-large-patch14-336 and XTuner's pretrained projector")
_visual_instruction(
    "qmoslora_vi_internlm2", "internlm2_vl", {**_VI_CONFIG, "rank": 512, "alpha": 256, "targets": "internlm2_vl"},
    {"learning_rate": 2e-5, "train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 1}, 2e-4,
    {"load_in_4bit": True},
    cite="MoSLoRA §4.2, Table 8 (InternLM2+ViT column), App. B.2 (NF4 with double quantisation); Table 5 (59.5 avg)",
    notes="QMoSLoRA: the LLM loaded in 4-bit NF4 with double quantisation (mm_subspace.load_4bit), MoSLoRA r=512 "
          "α=256 on InternLM2's real module names wqkv, wo, w1, w2, w3 (preset internlm2_vl; the fused GQA wqkv is "
          "adapted whole, as PEFT/XTuner do), ViT linears r=64 α=16. The official config differs: lr 2e-4 (not "
          "Table 8's 2e-5), plain LoRA on the ViT (lora_use_mixer=False), projector trained fully: "
          "qmoslora_vi_internlm2_official.",
    official_cite="kaiming_mix_lora_llava_internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu4_finetune.py",
    official_notes="lr 2e-4 (Table 8 says 2e-5), fp16 compute dtype, per-device batch 16. The official ViT adapter is "
                   "plain LoRA (no mixer); one mm_subspace config has one method, so this recipe puts MoSLoRA on the "
                   "ViT too (+64² params per ViT linear) — inject a separate lora config on the vision tower to match "
                   "it exactly.",
    model=_VI_INTERNLM2_MODEL,
)

_SDXL = dict(rank=4, alpha=4.0, targets="sdxl_unet")
_SDXL_TRAINING = {"learning_rate": 1e-4, "train_batch_size": 1, "gradient_accumulation_steps": 4,
                  "max_train_steps": 500, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "num_validation_inference_steps": 50, "seed": 0}
_SDXL_EXTRA = {"with_prior_preservation": False, "train_text_encoder": False}
_SDXL_NOTES = ("Official train_sdxl_lora_cat.sh: diffusers' train_dreambooth_lora_sdxl.py defaults (rank 4, "
               "alpha = rank, UNet to_q/to_k/to_v/to_out.0), no prior preservation, no text-encoder training, "
               "batch 1 × accumulation 4 (the paper's batch 4), constant lr 1e-4, 500 steps, resolution 1024 "
               "(our default for SDXL), fp16 with madebyollin/sdxl-vae-fp16-fix, prompt 'a photo of ikat cat'; "
               "images at 50 inference steps (§4.3, infer.py).")
register_recipe(Recipe(
    "moslora_sdxl", "sdxl", "moslora", {**_SDXL, "mixer_init": "orthogonal"}, dict(_SDXL_TRAINING),
    dict(_SDXL_EXTRA),
    cite="MoSLoRA §4.3 (SDXL DreamBooth: orthogonal mixer, lr 1e-4, batch 4, 500 steps, 50 inference steps); "
         "official subject_driven_generation/train_sdxl_lora_cat.sh",
    notes=_SDXL_NOTES + " Alias: moslora_paper.", model="stabilityai/stable-diffusion-xl-base-1.0",
))
register_recipe(Recipe(
    "lora_sdxl", "sdxl", "lora", dict(_SDXL), dict(_SDXL_TRAINING), dict(_SDXL_EXTRA),
    cite="MoSLoRA §4.3, Table 6 (the LoRA side of the human evaluation); official train_sdxl_lora_cat.sh (first run)",
    notes=_SDXL_NOTES, model="stabilityai/stable-diffusion-xl-base-1.0",
))

# -- SuLoRA (Ding et al. 2025) -------------------------------------------------------------------------------
_SULORA_ALPHA = ("The paper gives no α: alpha = r with the default alpha/r scaling is Eq. (4) with α = 1; for the "
                 "paper's convention pass scaling_mode='alpha' and your α.")
_GLUE = "GLUE (CoLA, SST-2, MRPC, QNLI, STS-B, RTE, MNLI, QQP); 3 seeds averaged (§4.3)."
register_recipe(Recipe(
    "sulora_glue_r4", "roberta", "sulora", dict(rank=4, alpha=4.0, num_subspaces=8, targets="roberta_qv"),
    cite="SuLoRA §4.3 (RoBERTa-base, W_Q and W_V only, r=4 with N=8), Table 1 (89.17 avg), Table 7 (N sweep)",
    notes="No learning rate, batch or epochs are given for GLUE. Table 1's #Params (0.34M) are not this setting's: "
          "they match r=4 B-only on all six linear layers, halved from the AdaLoRA/MELoRA LoRA baseline (see "
          "docs/methods.md). " + _SULORA_ALPHA + " " + _GLUE,
    model="FacebookAI/roberta-base",
))
register_recipe(Recipe(
    "sulora_glue_r8", "roberta", "sulora", dict(rank=8, alpha=8.0, num_subspaces=16, targets="roberta_qv"),
    cite="SuLoRA §4.3 (RoBERTa-base, W_Q and W_V only, r=8 with N=16), Table 1 (89.87 avg), Table 11 (N=16 marked *)",
    notes="No learning rate, batch or epochs are given for GLUE; Table 1's 0.67M is not this setting's count (see "
          "docs/methods.md). " + _SULORA_ALPHA + " " + _GLUE,
    model="FacebookAI/roberta-base",
))
register_recipe(Recipe(
    "sulora_instructeval", "llama", "sulora", dict(rank=64, alpha=64.0, num_subspaces=128, targets="llama_qv"),
    {"learning_rate": 3e-4, "lr_scheduler": "linear", "train_batch_size": 16, "num_train_epochs": 3},
    cite="SuLoRA §4.3 (LLaMA-2-7B, W_Q/W_V, AdamW, 3 epochs, linear schedule from 3e-4, batch 16, N = 2r), Table 3",
    notes="The rank is not stated for INSTRUCTEVAL: Table 3's LoRA baseline (33.6M) is exactly r=64 on q,v of "
          "LLaMA-2-7B (tested), and on GLUE SuLoRA is compared at the LoRA baseline's rank, so r=64, N=128. "
          "Data: cleaned Alpaca, 2k random samples held out as dev; INSTRUCTEVAL 5-shot MMLU, 3-shot BBH/DROP, "
          "0-shot HumanEval. " + _SULORA_ALPHA,
    model="meta-llama/Llama-2-7b-hf",
))
register_recipe(Recipe(
    "sulora_domainbed", "timm_vit", "sulora", dict(rank=8, alpha=8.0, num_subspaces=16, targets="timm_vit_qv"),
    cite="SuLoRA §4.3 (ImageNet-pretrained ViT, W_Q and W_V), Table 2 (SuLoRA r=8, N = 2r)",
    notes="timm's fused attn.qkv adapted as q and v slices (k untouched). The ViT size and the training "
          "hyper-parameters are not given; DomainBed VLCS/PACS/OfficeHome with 80/20 splits, trained per "
          "environment (LabelMe, Cartoon, Clipart). " + _SULORA_ALPHA,
    model="an ImageNet-pretrained timm ViT (size not stated)",
))
register_recipe(Recipe(
    "sulora_llava", "llava", "sulora", dict(rank=8, alpha=8.0, num_subspaces=16, targets="llava_qv"),
    extra={"tune_projector": "frozen", "freeze_vision_tower": True, "load_in_4bit": False},
    cite="SuLoRA §4.3 (LLaVA-v1 13B, W_Q and W_V), Table 4 / Table 10 (SuLoRA vs LoRA r=8)",
    notes="Instruction tuning on a 182,167-example Vision-Flan subset (187 tasks, ≤1000 each) following Shen et al. "
          "2024; zero-shot on Text-VQA, VSR, CIFAR-100, MNIST, MME. Only the language model's q,v are adapted; what "
          "happens to the projector and vision tower is not stated (we keep both frozen). No hyper-parameters "
          "given. " + _SULORA_ALPHA,
    model="LLaVA-v1 13B (stage-one aligned)",
))

# -- subspace-tuning survey, GLUE grid (Supplementary Tables 2-4, 6) -------------------------------------------
#: per-task learning rate / epochs, batch 32 everywhere (Supplementary Table 6)
SURVEY_GLUE_TASKS: dict[str, dict[str, Any]] = {
    "mnli": {"learning_rate": 5e-4, "num_train_epochs": 7},
    "rte": {"learning_rate": 1.2e-3, "num_train_epochs": 50},
    "qnli": {"learning_rate": 1.2e-3, "num_train_epochs": 5},
    "mrpc": {"learning_rate": 1e-3, "num_train_epochs": 30},
    "qqp": {"learning_rate": 5e-4, "num_train_epochs": 5},
    "sst2": {"learning_rate": 8e-4, "num_train_epochs": 24},
    "cola": {"learning_rate": 5e-4, "num_train_epochs": 25},
    "stsb": {"learning_rate": 2.2e-3, "num_train_epochs": 25},
}
SURVEY_MODELS = {  # name -> (family, hub id, table)
    "roberta_base": ("roberta", "FacebookAI/roberta-base", "Supplementary Table 2"),
    "deberta_v3_base": ("deberta_v2", "microsoft/deberta-v3-base", "Supplementary Table 3"),
    "roberta_large": ("roberta", "FacebookAI/roberta-large", "Supplementary Table 4"),
}
#: survey method name -> (registry method, extra config); used with ranks 2, 4, 8, 16 on all linear layers
SURVEY_RANK_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "lora_mpc_o": ("lora", {"mpc": "orthogonal"}),
    "lora_mpc_d": ("lora", {"mpc": "diagonal"}),
    "lora_mpc_n": ("lora", {"mpc": "nonlinear"}),
    "trilora": ("trilora", {}),
    "trilora_mpc_o": ("trilora", {"mpc": "orthogonal"}),
    "flora": ("flora", {}),
    "dora": ("dora", {}),
    "pa": ("parallel_adapter", {}),
}
#: rank-free methods: (registry method, target preset suffix or "" for all linear layers, extra config)
SURVEY_FIXED_METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ia3": ("ia3", "_ia3", {"feedforward": ["output.dense"]}),
    "ssl": ("ssl", "_kvi", {}),
    "ssb": ("ssb", "_kvi", {}),
    "bitfit": ("bitfit", "", {}),
    "sam_parser": ("sam_parser", "", {}),
}
SURVEY_RANKS = (2, 4, 8, 16)
_SURVEY_NOTES = ("The survey adopts each method's original configuration and does not list alpha, dropout or MPC "
                 "weights: alpha = r (scale 1), dropout 0 and mpc_coef 0.1 are our choices. 5 seeds averaged. "
                 "Per-task lr/epochs in recipe.tasks (Supplementary Table 6), batch 32.")


def _register_survey() -> None:
    for model, (family, hub, table) in SURVEY_MODELS.items():
        all_linear = family  # presets "roberta" / "deberta_v2"
        cite = f"subspace-tuning survey, Implementation Details; {table} (% params), Supplementary Table 6"
        for name, (method, cfg) in SURVEY_RANK_METHODS.items():
            for rank in SURVEY_RANKS:
                register_recipe(Recipe(
                    f"survey_glue_{model}_{name}_r{rank}", family, method,
                    {"rank": rank, "alpha": float(rank), "targets": all_linear, **cfg},
                    {"train_batch_size": 32}, cite=cite, notes="All linear layers of every encoder layer. "
                    + _SURVEY_NOTES, model=hub, tasks=copy.deepcopy(SURVEY_GLUE_TASKS),
                ))
        for name, (method, suffix, cfg) in SURVEY_FIXED_METHODS.items():
            where = {"_ia3": "keys, values and the FFN intermediate activation (input of output.dense)",
                     "_kvi": "keys, values and the FFN intermediate (intermediate.dense), matching the survey's counts",
                     "": "all linear layers"}[suffix]
            extra_note = (" The survey's BitFit also trains the LayerNorm biases; ours adds a bias shift to the "
                          "linear layers only (see docs/methods.md)." if method == "bitfit" else "")
            register_recipe(Recipe(
                f"survey_glue_{model}_{name}", family, method, {"targets": all_linear + suffix, **cfg},
                {"train_batch_size": 32}, cite=cite, notes=f"On {where}.{extra_note} " + _SURVEY_NOTES,
                model=hub, tasks=copy.deepcopy(SURVEY_GLUE_TASKS),
            ))


_register_survey()
