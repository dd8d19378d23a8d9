"""Training-script glue: ``--recipe NAME`` sets every flag the user did not pass (:func:`apply_recipe_to_args`).

Works on any script's ``argparse`` namespace: config fields go to the flags of :data:`CONFIG_FLAGS` (or a flag
of the same name), ``training``/``extra`` keys to flags of their name (aliases: :data:`FLAG_ALIASES`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .registry import Recipe, get_recipe

logger = logging.getLogger(__name__)


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
    from ..registry import get_method

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
