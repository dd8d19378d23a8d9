"""Recipes of the subspace-tuning survey: the GLUE grid (Supplementary Tables 2-4, 6).

Names ``survey_glue_<model>_<method>[_r<rank>]``; per-task learning rate and epochs in ``recipe.tasks``.
"""

from __future__ import annotations

import copy
from typing import Any

from .registry import Recipe, register_recipe

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
