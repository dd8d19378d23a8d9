"""Flags both training scripts share: one definition each (type, default, help); a script overrides only what differs.

    g = parser.add_argument_group("adapter")
    add_flags(g, "--adapter", "--rank", "--alpha", rank={"default": 16, "help": "LLM adapter rank r."})

Names follow diffusers' DreamBooth script (``--train_batch_size``, ``--checkpointing_steps``, ...).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

from mm_subspace.distributed import DEFAULT_DDP_TIMEOUT, DEFAULT_MAX_SKIPPED_STEPS


def finite_float(text: str) -> float:
    """argparse type of every float flag: ``nan``/``inf`` are refused at parse time (``--learning_rate nan`` would
    train a NaN adapter and save it as a checkpoint; ``--max_grad_norm nan`` would silently disable clipping)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


#: flag -> ``add_argument`` keyword arguments
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    # adapter
    "--adapter": {"type": str, "default": "moslora",
                  "help": "Adapter method: any of mm_subspace.list_methods() (lora, moslora, sulora, ts_mixing, ...)."},
    "--rank": {"type": int, "default": 4, "help": "Rank r of the adapter's low-rank factors."},
    "--alpha": {"type": finite_float, "default": None, "help": "Scale numerator (ΔW scaled by alpha/rank). Default: = rank."},
    "--lora_dropout": {"type": finite_float, "default": 0.0, "help": "Dropout on the adapter input."},
    "--mixer_init": {"type": str, "default": None,
                     "help": "MoSLoRA mixer init: orthogonal (default), kaiming_uniform (the paper's, a=sqrt(5): "
                     "~0.58x the step, docs/methods.md), kaiming_unit, identity, normal, normal_unit, zero. Only for "
                     "methods with a mixer_init field."},
    "--num_subspaces": {"type": int, "default": None,
                        "help": "SuLoRA: number of subspaces N the router picks r of (default 2r). Only for methods with "
                        "a num_subspaces field."},
    "--pairing": {"type": str, "default": None,
                  "help": "SuLoRA: paired (default: sub-space i = (a_i, b_i)) or index (Eq. 4 read literally). Only for "
                  "methods with a pairing field."},
    "--a_init": {"type": str, "default": None,
                 "help": "AsyLoRA/SuLoRA frozen A: orthonormal (default, as AsyLoRA's code) or kaiming. Only for methods "
                 "with an a_init field."},
    "--router_temperature": {"type": float, "default": None,
                             "help": "SuLoRA: router softmax temperature (default 1). Only for methods with a "
                             "router_temperature field."},
    "--balance_coef": {"type": finite_float, "default": None,
                       "help": "SuLoRA: weight of the load-balance loss (Eq. 6) added to the objective (default 0: off; the "
                       "sulora_* recipes use 0.01). Only for methods with a balance_coef field."},
    # training
    "--recipe": {"type": str, "default": None,
                 "help": "Paper setting from mm_subspace.recipes (`mm-subspace recipes` lists them). Flags given "
                 "explicitly win."},
    "--train_batch_size": {"type": int, "default": 1, "help": "Batch size per process."},
    "--gradient_accumulation_steps": {"type": int, "default": 1, "help": "Micro-batches per optimizer step."},
    "--max_train_steps": {"type": int, "default": None, "help": "Optimizer steps; wins over --num_train_epochs."},
    "--num_train_epochs": {"type": int, "default": None, "help": "Passes over the data when --max_train_steps is not given."},
    "--learning_rate": {"type": finite_float, "default": 1e-4, "help": "Learning rate of the adapter parameters."},
    "--lr_scheduler": {"type": str, "default": "constant",
                       "help": 'Scheduler: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                       '"constant_with_warmup".'},
    "--lr_warmup_steps": {"type": int, "default": 0, "help": "Warm-up steps of the scheduler."},
    "--adam_beta1": {"type": finite_float, "default": 0.9, "help": "AdamW beta1."},
    "--adam_beta2": {"type": finite_float, "default": 0.999, "help": "AdamW beta2."},
    "--adam_weight_decay": {"type": finite_float, "default": 0.0, "help": "AdamW weight decay of the adapters."},
    "--adam_epsilon": {"type": finite_float, "default": 1e-8, "help": "AdamW epsilon."},
    "--max_grad_norm": {"type": finite_float, "default": 1.0, "help": "Gradient clipping norm (0 disables)."},
    "--mixed_precision": {"type": str, "default": None, "choices": ["no", "fp16", "bf16"],
                          "help": "Mixed precision; frozen weights are cast to it, adapters stay fp32. Default: "
                          "accelerate config."},
    "--gradient_checkpointing": {"action": "store_true", "help": "Trade compute for memory."},
    "--threads": {"type": int, "default": None,
                  "help": "torch intra-op threads per process on CPU. Default: $OMP_NUM_THREADS when set, else half the "
                  "cores this process may use, split among the processes of the machine (1 on a 2-core machine, where "
                  "more threads contend with each other and with other jobs). Ignored on a GPU."},
    "--seed": {"type": int, "default": 0, "help": "Seed of every random draw (adapter init, data order, dropout, noise)."},
    "--max_skipped_steps": {"type": int, "default": DEFAULT_MAX_SKIPPED_STEPS,
                            "help": "fp16: the loss scaler skips the steps whose gradients overflow while it calibrates "
                            "(counted and logged as skipped_steps). Stop after this many consecutive skipped steps."},
    "--ddp_timeout": {"type": int, "default": DEFAULT_DDP_TIMEOUT,
                      "help": "Process-group timeout in seconds: how long the other ranks wait for rank-0-only work "
                      "(final evaluation, --save_merged, model card) before the run fails."},
    # checkpoints
    "--output_dir": {"type": str, "default": None,
                     "help": "Output folder (the comparison app scans runs/)."},
    "--checkpointing_steps": {"type": int, "default": None,
                              "help": "Save a resumable checkpoint (<output_dir>/checkpoint-<step>, as diffusers) every N optimizer "
                              "steps. Default: 500, or half of --max_train_steps when that is less."},
    "--checkpoints_total_limit": {"type": int, "default": None, "help": "Keep at most this many checkpoints."},
    "--resume_from_checkpoint": {"type": str, "default": None,
                                 "help": '"latest", a checkpoint name (checkpoint-10) or path. "latest" with none starts '
                                 'fresh.'},
    # logging
    "--report_to": {"type": str, "default": "tensorboard",
                    "help": 'Tracker: "tensorboard" (offline, <output_dir>/logs), "wandb", "comet_ml", ..., "all" or '
                    '"none". Logs go to every one that is installed; missing ones are named and skipped.'},
    "--logging_dir": {"type": str, "default": "logs", "help": "Tracker folder, relative to --output_dir."},
}


def add_flags(group: argparse._ActionsContainer, *names: str, **overrides: dict[str, Any]) -> None:
    """Add the shared flags ``names`` to ``group``; ``overrides[dest]`` replaces keyword arguments of one flag.

    Raises:
        KeyError: a name that is not in :data:`SHARED_FLAGS`, or an override for a flag not added.
    """
    unknown = set(overrides) - {n.lstrip("-") for n in names}
    if unknown:
        raise KeyError(f"overrides for flags not added: {sorted(unknown)}")
    for name in names:
        group.add_argument(name, **{**SHARED_FLAGS[name], **overrides.get(name.lstrip("-"), {})})


def cpu_threads(requested: int | None, local_processes: int = 1) -> int:
    """Intra-op threads for a CPU run: ``requested`` (``--threads``), else ``$OMP_NUM_THREADS`` when set, else half
    the cores this process may use, split among ``local_processes`` (at least 1).

    A shared 2-core machine runs the tiny models about 4x faster on one thread than on two (measured:
    100 DreamBooth steps in 116 s on 2 threads, 250 steps in 29 s on 1).
    """
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (2 * max(1, local_processes)))


def str_to_bool(value: str) -> bool:
    """argparse type for true/false flags (diffusers' ``type=bool`` makes "False" true)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


#: flags whose value must lie in [0, 1): probabilities and Adam's averaging coefficients
UNIT_INTERVAL_FLAGS = ("lora_dropout", "adam_beta1", "adam_beta2", "prodigy_beta3", "lr_warmup_ratio")


def check_unit_interval(args: argparse.Namespace, names: Sequence[str] = UNIT_INTERVAL_FLAGS) -> None:
    """Each flag of ``names`` the parser has and that is set must be in [0, 1); else a ConfigError naming it."""
    from mm_subspace.errors import ConfigError

    for name in names:
        value = getattr(args, name, None)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {value}")


def flags_markdown(parser: argparse.ArgumentParser) -> str:
    """The flag tables of a script's docs (one per argument group: flag, default, meaning + choices), from its parser;
    docs/dreambooth.md holds exactly this for the DreamBooth script (tested), so --help and the docs agree."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions or group.title in ("options", "optional arguments", "positional arguments"):
            continue
        out += [f"**{group.title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            names = " / ".join(f"`{o}`" for o in a.option_strings if o.startswith("--"))
            if isinstance(a, argparse._StoreTrueAction):
                default = "off"
            elif isinstance(a, argparse.BooleanOptionalAction) and isinstance(a.default, bool):
                default = "on" if a.default else "off"
            elif a.default is None:
                default = "—"
            else:
                default = f"`{a.default}`"
            text = a.help or ""
            if a.choices:
                text += f" Choices: {', '.join(map(str, a.choices))}."
            out.append(f"| {names} | {default} | {text.replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
