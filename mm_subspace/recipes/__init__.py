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

One module per concern: :mod:`~mm_subspace.recipes.registry` (families, :class:`Recipe`, the registry),
:mod:`~mm_subspace.recipes.apply` (argparse glue) and one catalogue per paper (:mod:`~mm_subspace.recipes.moslora`,
:mod:`~mm_subspace.recipes.sulora`, :mod:`~mm_subspace.recipes.survey`), imported here so their recipes are registered.

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

from . import moslora, sulora, survey  # noqa: F401  (the catalogues: importing them registers their recipes)
from .apply import CONFIG_FLAGS, FLAG_ALIASES, METHOD_DESTS, apply_recipe_to_args, explicit_dests
from .moslora import VISION_PATTERN
from .registry import (
    ALIASES,
    FAMILIES,
    RECIPES,
    Family,
    Recipe,
    RecipeFamilyError,
    detect_families,
    get_recipe,
    list_recipes,
    register_recipe,
)
from .survey import SURVEY_FIXED_METHODS, SURVEY_GLUE_TASKS, SURVEY_MODELS, SURVEY_RANK_METHODS, SURVEY_RANKS

__all__ = [
    "ALIASES",
    "CONFIG_FLAGS",
    "FAMILIES",
    "FLAG_ALIASES",
    "METHOD_DESTS",
    "RECIPES",
    "SURVEY_FIXED_METHODS",
    "SURVEY_GLUE_TASKS",
    "SURVEY_MODELS",
    "SURVEY_RANKS",
    "SURVEY_RANK_METHODS",
    "VISION_PATTERN",
    "Family",
    "Recipe",
    "RecipeFamilyError",
    "apply_recipe_to_args",
    "detect_families",
    "explicit_dests",
    "get_recipe",
    "list_recipes",
    "register_recipe",
]
