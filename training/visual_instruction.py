#!/usr/bin/env python
"""LLaVA-style visual-instruction tuning with any mm_subspace adapter (full precision or 4-bit).

    accelerate launch training/visual_instruction.py --adapter moslora

With no other flag it runs offline on the embedded default: the shipped pretrained tiny LLaVA
(``mm_subspace/weights/tiny-llava-digits``: CLIP vision tower + LLaMA LM + projector, real CLIP BPE
tokenizer, pretrained on captions of scikit-learn's digits) and five instruction tasks over the same
digits it has never been trained on (is it even; is it greater than five; the digit plus one; the
digit as a numeral; the digit as a word), with a fixed train/test split. After training it answers the
test split greedily and writes per-task exact-match accuracy (``eval.json`` and the model card).

The real path: ``--model_name_or_path`` (a transformers LLaVA checkpoint folder or hub id),
``--data_path`` + ``--image_folder`` in LLaVA's JSON conversation format (multi-turn records
included), ``--eval_data_path`` for the evaluation records (the last gpt turn is the reference).

Modelled on LLaVA's ``llava/train/train.py`` (conversation records, ``<image>`` placeholder, loss on
assistant tokens only with ``IGNORE_INDEX``) and on our DreamBooth script (accelerate, atomic
checkpoints, bit-exact ``--resume_from_checkpoint latest``, NaN guard, loss curve, model card), and
beyond them:

* ``--adapter`` takes any registered method; aux losses (SuLoRA balance, MPC) are added and logged.
* One save holds everything trained: ``adapter_config.json`` + ``adapter_model.safetensors`` in
  ``--output_dir`` carry the LLM (and vision) adapters and, with ``--tune_projector full``, the
  projector weights (no separate ``non_lora_trainables.bin``; LLaVA#1592, #1416). ``peft/`` is the
  same adapter for stock PEFT when the method folds into LoRA; ``--save_merged`` writes
  ``merged/``, a full ``save_pretrained`` model (``mm_subspace.pipelines.llava.save_merged_llava``).
* A record whose label mask does not line up with its tokens is an error naming the record, never a
  silently skipped sample or a zero loss (LLaVA#1166); bad records stop the run before training
  unless ``--skip_bad_records``.
* SuLoRA routes once per sequence on its prompt, in training and in ``generate`` alike
  (``mm_subspace.inject.routing``).
* ``--recipe moslora_vi_llama3``: MoSLoRA Table 8 (LLaMA3+ViT), from :mod:`mm_subspace.recipes`
  (applied by ``recipes.apply_recipe_to_args``, as in the DreamBooth script). Flags given explicitly win.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import mm_subspace
from mm_subspace import presets, tiny_models
from mm_subspace.atomic import atomic_write_text
from mm_subspace.compat import enable_activation_checkpointing
from mm_subspace.data import llava as data
from mm_subspace.distributed import (
    SkippedSteps,
    apply_test_overrides,
    check_setup,
    log_sharding,
    process_group_kwargs,
    replicate_trainable,
    sync_replicated_grads,
)
from mm_subspace.errors import ConfigError, MergeError
from mm_subspace.hub import resolve_model
from mm_subspace.inject import routing
from mm_subspace.methods import sulora
from mm_subspace.training.llava_eval import _append_eval_to_card, _model_card, generation_routing, run_eval
from mm_subspace.training.script_flags import add_flags, check_unit_interval, finite_float
from mm_subspace.training_utils import (
    ADAPTER_NAME,
    CheckpointManager,
    LossHistory,
    adapter_summary,
    assert_replicas_in_sync,
    cast_trainable_params,
    check_finite,
    check_method_flags,
    check_positive,
    locate_nonfinite,
    method_flag_values,
    nonfinite_parameters,
    param_groups,
    resume_mixed_precision,
    sample_indices,
    save_loss_curve,
    step_seed,
    unwrap,
)

logger = logging.getLogger("visual_instruction")

EMBEDDED_MAX_STEPS = 800
#: on the embedded default, vision adapters of this rank unless --vision_rank / --freeze_vision_tower is given
EMBEDDED_VISION_RANK = 8
#: the embedded default's learning rate for the methods that need another than --learning_rate's 2e-3 (flags and recipes
#: win): SuLoRA (only B and the router train) reached LoRA r 16's 92.1 ± 1.9 % only at 6e-3 (92.9 ± 1.1, 3 seeds; 88.6 at
#: 2e-3) — AsyLoRA, which also trains only B, dropped to 86 % on one seed of two at 6e-3 (docs/methods.md)
EMBEDDED_METHOD_LEARNING_RATES: dict[str, float] = {"sulora": 6e-3}
#: the LM's q,k,v,o,gate,up,down projections; every linear of the CLIP vision tower; the projector's linear_1/2
LLM_TARGETS, VISION_TARGETS, PROJECTOR_TARGETS = (presets.LLAVA_LM_TARGETS, presets.LLAVA_VISION_TARGETS,
                                                  presets.LLAVA_PROJECTOR_TARGETS)
FOUR_BIT_SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]  # QLoRA: quantise the LM only

#: ``--recipe`` names: the LLaVA recipes of :mod:`mm_subspace.recipes` this script runs
RECIPES = ("moslora_vi_llama3", "moslora_vi_llama3_official")


# --------------------------------------------------------------------------------------------- args
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Visual-instruction tuning of a LLaVA with any mm_subspace adapter. No arguments: the shipped "
        "pretrained tiny LLaVA and five held-out instruction tasks over scikit-learn's digits, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", type=str, default=None,
                   help="transformers LLaVA folder or hub id (LlavaForConditionalGeneration + its processor). Default: "
                   "the shipped tiny-llava-digits (mm_subspace.tiny_models.tiny_llava_path()).")
    g.add_argument("--load_in_4bit", action="store_true",
                   help="QLoRA/QMoSLoRA: the language model in 4-bit (bitsandbytes NF4, double quantisation); the vision "
                   "tower, projector and lm_head stay in full precision.")
    g.add_argument("--bnb_4bit_quant_type", type=str, default="nf4", choices=["nf4", "fp4"], help="4-bit data type.")
    g.add_argument("--bnb_4bit_compute_dtype", type=str, default=None, choices=["float32", "bfloat16", "float16"],
                   help="Compute dtype of the 4-bit matmuls. Default: bfloat16 where the GPU supports it for a real "
                   "--model_name_or_path, else float32 (CPU, the embedded model).")
    g.add_argument("--model_max_length", type=int, default=None,
                   help="Truncate longer records (with a warning and a count). Default: the tokenizer's model_max_length.")

    g = parser.add_argument_group("adapter")
    add_flags(g, "--adapter", "--rank", "--alpha", "--lora_dropout", "--mixer_init", "--num_subspaces", "--pairing", "--a_init",
              "--router_temperature", "--balance_coef",
              rank={"default": 16, "help": "LLM adapter rank r."},
              alpha={"help": "LLM adapter alpha (ΔW scaled by alpha/r). Default: 2·rank."})
    g.add_argument("--vision_rank", type=int, default=None,
                   help="Also adapt every linear of the vision tower with this rank (paper Table 8: 64). Default: "
                   f"{EMBEDDED_VISION_RANK} on the embedded default (digits data and model), else no vision adapters.")
    g.add_argument("--vision_alpha", type=finite_float, default=None, help="Vision adapter alpha (Table 8: 16). Default: = vision rank.")
    g.add_argument("--freeze_vision_tower", action="store_true",
                   help="Keep the vision tower exactly as pretrained (no vision adapters even with --vision_rank).")
    g.add_argument("--tune_projector", type=str, default="frozen",
                   choices=[*presets.PROJECTOR_MODE_WORDS, *presets.PROJECTOR_MODES],
                   help="Multimodal projector: frozen (the pretrained one, as the paper), full (trained fully, saved in "
                   "the same adapter file), adapter (adapters on linear_1/linear_2 with the vision rank/alpha, or the LLM's). "
                   "presets.llava_config's words freeze / train / adapt mean the same.")

    g = parser.add_argument_group("data")
    g.add_argument("--data_path", type=str, default=None,
                   help="LLaVA JSON (a list) or JSONL of {'id', 'image', 'conversations': [{'from': 'human'|'gpt', "
                   "'value'}]}. Default: the digits instruction tasks (train split).")
    g.add_argument("--image_folder", type=str, default=None, help="Folder the records' 'image' paths are relative to.")
    g.add_argument("--allow_outside_data", action="store_true",
                   help="Accept records whose 'image' resolves outside --image_folder (data kept elsewhere on purpose). "
                   "Default: refused, naming the record.")
    g.add_argument("--eval_data_path", type=str, default=None,
                   help="Evaluation records (same format; the last gpt turn is the reference answer, an optional 'task' "
                   "field groups the accuracy). Default: the digits test split when --data_path is not given.")
    g.add_argument("--tasks", type=str, default=None,
                   help=f"Comma-separated digits tasks (default all: {','.join(data.DIGIT_TASKS)}).")
    g.add_argument("--train_limit", type=int, default=None, help="Digits: use only the first N train images (quick runs).")
    g.add_argument("--eval_limit", type=int, default=None, help="Evaluate on the first N test images / records only.")
    g.add_argument("--skip_bad_records", action="store_true",
                   help="Skip malformed records with a warning and a count, instead of stopping before training.")
    g.add_argument("--conversation_template", type=str, default="auto", choices=data.TEMPLATE_CHOICES,
                   help="How conversations are written and supervised: vicuna_v1 (LLaVA-1.5: 'USER: … ASSISTANT: "
                   "answer</s>', every answer with its </s>), llama3_chat (XTuner's LLaMA3 template, the MoSLoRA paper's), "
                   "plain (LLaVA pretraining: <image>caption), auto (the processor's chat template decides; the log says "
                   "which).")
    g.add_argument("--system_prompt", type=str, default=None,
                   help="System prompt of the conversation template (default: the template's; vicuna_v1: LLaVA's "
                   "'A chat between a curious user …'). \"\" for none.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Processes that decode images and tokenize records ahead of the training step (0: in the "
                   "training process). Records are read lazily either way: memory does not grow with the data set.")
    g.add_argument("--group_by_modality_length", action="store_true",
                   help="As LLaVA: batches of one modality (image or text-only records) and similar lengths, shuffled "
                   "by mega-batch (less padding, no mixed batches).")

    g = parser.add_argument_group("training")
    add_flags(g, "--recipe", "--train_batch_size", "--gradient_accumulation_steps", "--max_train_steps",
              "--num_train_epochs", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
              "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon",
              "--max_grad_norm", "--mixed_precision", "--gradient_checkpointing", "--seed", "--max_skipped_steps",
              "--ddp_timeout",
              recipe={"help": 'From mm_subspace.recipes: moslora_vi_llama3 = MoSLoRA Table 8 (LLaMA3+ViT): LLM r 64 α 128, ViT r 64 α '
                              '16, batch 8 × accumulation 2, lr 2e-5, 1 epoch, projector frozen; moslora_vi_llama3_official = the same '
                              'as the official XTuner config runs it (projector trained). Flags given explicitly win.'},
              train_batch_size={"default": 16, "help": "Batch size per process. Default: 16 on the embedded "
                                "model; a real --model_name_or_path takes the MoSLoRA recipe's (8, with accumulation 2)."},
              max_train_steps={"help": f'Optimizer steps; overrides --num_train_epochs. Default: {EMBEDDED_MAX_STEPS} on the embedded '
                                       'default, else from --num_train_epochs.'},
              num_train_epochs={"type": finite_float, "default": 1.0, "help": 'Epochs when --max_train_steps is not given.'},
              learning_rate={"default": 0.002, "help": 'Learning rate of the adapters (and projector). Default: 2e-3 on '
                             'the embedded model (SuLoRA: 6e-3); a real --model_name_or_path takes the MoSLoRA recipe\'s 2e-5.'},
              lr_scheduler={"default": "cosine"},
              lr_warmup_steps={"default": None, "help": 'Warm-up steps. Default: --lr_warmup_ratio of the steps.'},
              gradient_checkpointing={"action": argparse.BooleanOptionalAction, "default": None,
                                      "help": "Trade compute for memory in the LM. Default: on for a real "
                                      "--model_name_or_path, off for the embedded tiny model."})
    g.add_argument("--lr_warmup_ratio", type=finite_float, default=0.03, help="Warm-up as a fraction of the steps (LLaVA-1.5: 0.03).")

    g = parser.add_argument_group("checkpoints")
    add_flags(g, "--output_dir", "--checkpointing_steps", "--checkpoints_total_limit",
              "--resume_from_checkpoint",
              output_dir={"help": "Output folder. Default: runs/llava-<adapter> (the comparison app scans runs/)."})
    g.add_argument("--save_merged", action="store_true",
                   help="Also write merged/: the adapter folded into a full-precision copy of the base (save_pretrained).")

    g = parser.add_argument_group("evaluation and logging")
    g.add_argument("--eval_only", action="store_true",
                   help="Only evaluate: the adapter in --output_dir (or --adapter_path) if there is one, else the base.")
    g.add_argument("--adapter_path", type=str, default=None, help="Adapter folder to evaluate with --eval_only.")
    g.add_argument("--eval_base", action="store_true", help="Also evaluate the base model (adapters off) for comparison.")
    g.add_argument("--skip_eval", action="store_true", help="No evaluation after training.")
    g.add_argument("--eval_batch_size", type=int, default=96, help="Prompts per generate() call.")
    g.add_argument("--max_new_tokens", type=int, default=6, help="Greedy answer length limit.")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (1 is fastest on a shared CPU). Default: torch's.")
    add_flags(g, "--report_to", "--logging_dir")
    return parser


def apply_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser, input_args: list[str] | None) -> None:
    """``--recipe``: the recipe's values on every flag the user did not pass (``recipes.apply_recipe_to_args``).

    The recipe's ``vision_targets`` (``clip_vit``: every linear of the vision tower) is what this script adapts
    with ``--vision_rank``; it is checked, not set.
    """
    if args.recipe not in RECIPES:
        hint = (" (in mm_subspace.recipes moslora_paper is the SDXL recipe moslora_sdxl; the MoSLoRA paper's "
                "LLaVA setting is moslora_vi_llama3)") if args.recipe == "moslora_paper" else ""
        raise ConfigError(f"--recipe {args.recipe!r} is not a visual-instruction recipe{hint}; choose one of "
                          f"{', '.join(RECIPES)} (`mm-subspace recipes --family llava` lists them)")
    recipe = mm_subspace.recipes.get_recipe(args.recipe)
    extra = dict(recipe.extra)
    if extra.pop("vision_targets", "clip_vit") != "clip_vit":
        raise ConfigError(f"recipe {recipe.name}: vision_targets {recipe.extra['vision_targets']!r} is not what this "
                          "script adapts (every linear of the vision tower, clip_vit)")
    applied = mm_subspace.recipes.apply_recipe_to_args(dataclasses.replace(recipe, extra=extra), args, parser, input_args)
    logger.info("recipe %s (%s): %s", recipe.name, recipe.cite, applied)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags (bad combinations raise here, before anything loads)."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    if args.recipe:
        apply_recipe(args, parser, input_args)
    check_method_flags(args)
    explicit = mm_subspace.recipes.explicit_dests(parser, input_args)
    args.default_notes = real_model_defaults(args, explicit)
    if args.model_name_or_path is None and not args.recipe and "learning_rate" not in explicit:
        args.learning_rate = EMBEDDED_METHOD_LEARNING_RATES.get(args.adapter, args.learning_rate)
    check_positive(args, ["rank", "vision_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "num_train_epochs", "learning_rate", "checkpointing_steps", "checkpoints_total_limit",
                     "eval_batch_size", "max_new_tokens", "model_max_length", "train_limit", "eval_limit", "threads",
                     "max_skipped_steps", "ddp_timeout"])
    check_positive(args, ["lr_warmup_steps", "lr_warmup_ratio", "max_grad_norm", "lora_dropout", "adam_weight_decay",
                          "alpha", "vision_alpha", "dataloader_num_workers"], allow_zero=True)
    check_positive(args, ["adam_epsilon"])
    check_unit_interval(args)
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if (args.data_path is None and args.model_name_or_path is None and not args.recipe and args.vision_rank is None
            and not args.freeze_vision_tower):
        args.vision_rank = EMBEDDED_VISION_RANK
    if args.vision_rank is not None and args.vision_alpha is None:
        args.vision_alpha = float(args.vision_rank)
    if args.tasks is not None:
        args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in args.tasks if t not in data.DIGIT_TASKS]
        if unknown:
            raise ConfigError(f"--tasks: unknown digits task(s) {unknown}; known: {', '.join(data.DIGIT_TASKS)}")
    if args.data_path is not None and (args.tasks is not None or args.train_limit is not None):
        raise ConfigError("--tasks/--train_limit select the built-in digits data; drop them with --data_path")
    if args.data_path is None and args.image_folder is not None:
        raise ConfigError("--image_folder needs --data_path (the records whose images it holds)")
    for flag, value, kind in (("data_path", args.data_path, "file"), ("eval_data_path", args.eval_data_path, "file"),
                              ("image_folder", args.image_folder, "folder")):
        path = Path(value).expanduser() if value is not None else None
        if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
            raise ConfigError(f"--{flag} {value}: no such {kind}")
    args.embedded_model = args.model_name_or_path is None
    args.embedded_data = args.data_path is None
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"llava-{args.adapter}")
    return args


#: a real model's training values when neither a flag nor --recipe sets them: MoSLoRA Table 8 (LLaMA3+ViT)
REAL_MODEL_RECIPE = "moslora_vi_llama3"


def real_model_defaults(args: argparse.Namespace, explicit: set[str]) -> list[str]:
    """Defaults for a real ``--model_name_or_path`` (a 7B/8B LLaVA), where the embedded tiny model's would hurt.

    Sets, where no flag (and no ``--recipe``) chose them: learning rate, batch and accumulation of the MoSLoRA
    recipe (Table 8: lr 2e-5, 8 × 2), gradient checkpointing on, 4-bit compute in bfloat16 when the GPU
    supports it (float32 otherwise: bitsandbytes on CPU), and ``--mixed_precision bf16`` on such a GPU when
    neither the flag nor ``accelerate launch`` set it (the model is then loaded directly in bf16, half of
    fp32's memory). Returns one note per value chosen, with the reason (the script logs them).
    """
    notes: list[str] = []
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if args.model_name_or_path is None:
        if args.gradient_checkpointing is None:
            args.gradient_checkpointing = False
        if args.bnb_4bit_compute_dtype is None:
            args.bnb_4bit_compute_dtype = "float32"
        return notes
    if not args.recipe:
        recipe = mm_subspace.recipes.get_recipe(REAL_MODEL_RECIPE)
        for key in ("learning_rate", "train_batch_size", "gradient_accumulation_steps"):
            if key not in explicit:
                setattr(args, key, recipe.training[key])
                notes.append(f"--{key} {recipe.training[key]} (recipe {REAL_MODEL_RECIPE}: {recipe.cite.split(';')[0]})")
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = True
        notes.append("--gradient_checkpointing (a real model: activations of a 7B LM do not fit otherwise)")
    if args.bnb_4bit_compute_dtype is None:
        args.bnb_4bit_compute_dtype = "bfloat16" if cuda_bf16 else "float32"
        if args.load_in_4bit:
            notes.append(f"--bnb_4bit_compute_dtype {args.bnb_4bit_compute_dtype} ("
                         f"{'the GPU supports bf16' if cuda_bf16 else 'no bf16 GPU: float32'})")
    if args.mixed_precision is None and not os.environ.get("ACCELERATE_MIXED_PRECISION") and cuda_bf16:
        args.mixed_precision = "bf16"
        notes.append("--mixed_precision bf16 (the GPU supports it; the frozen model is loaded directly in bf16)")
    return notes


# --------------------------------------------------------------------------------------------- model
def adapter_config(args: argparse.Namespace) -> mm_subspace.AdapterConfig:
    """``config_for(args.adapter, ...)``: LLM targets, optional vision/projector adapters, projector training."""
    targets = [LLM_TARGETS]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if args.vision_rank is not None and not args.freeze_vision_tower:
        targets.append(VISION_TARGETS)
        rank_pattern[r"vision_tower\..*"] = args.vision_rank
        alpha_pattern[r"vision_tower\..*"] = args.vision_alpha
    projector = presets.projector_mode(args.tune_projector)
    if projector == "adapt":
        targets.append(PROJECTOR_TARGETS)
        if args.vision_rank is not None:
            rank_pattern[r"multi_modal_projector\..*"] = args.vision_rank
            alpha_pattern[r"multi_modal_projector\..*"] = args.vision_alpha
    kwargs: dict[str, Any] = dict(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout,
                                  targets="|".join(f"(?:{t})" for t in targets), rank_pattern=rank_pattern,
                                  alpha_pattern=alpha_pattern,
                                  trainable_modules=["multi_modal_projector"] if projector == "train" else [])
    kwargs.update(method_flag_values(args))
    return mm_subspace.config_for(args.adapter, **kwargs)


def load_model(args: argparse.Namespace, model_path: str, device: torch.device,
               dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, processor)``, in 4-bit with ``--load_in_4bit``.

    The weights are loaded directly in ``dtype`` (the training dtype: bf16 under ``--mixed_precision bf16``),
    never in float32 first: a 7B LLaVA in bf16 takes 14 GB of host memory, not 28 GB.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(model_path)
    if not hasattr(config, "vision_config"):
        raise ConfigError(f"{model_path} is a {type(config).__name__}, not a LLaVA (no vision_config): give a "
                          "LlavaForConditionalGeneration checkpoint")
    processor = AutoProcessor.from_pretrained(model_path)
    if args.load_in_4bit:
        from mm_subspace.quant import load_4bit

        dtype = getattr(torch, args.bnb_4bit_compute_dtype)
        model = load_4bit(model_path, LlavaForConditionalGeneration, quant_type=args.bnb_4bit_quant_type,
                          double_quant=True, compute_dtype=dtype, skip_modules=FOUR_BIT_SKIP,
                          device_map={"": str(device)}, gradient_checkpointing=args.gradient_checkpointing, dtype=dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(device)
    model.requires_grad_(False)
    return model, processor


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}


def supervised_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised (assistant) tokens.

    The head runs only on the positions that predict a label (``logits_to_keep`` as an index tensor):
    the same loss as ``model(..., labels=...).loss`` without a (batch, seq, vocab) logits tensor.
    """
    labels = batch["labels"]
    keep = (labels[:, 1:] != data.IGNORE_INDEX).any(0).nonzero().squeeze(1)  # positions p predicting p + 1
    logits = model(**model_inputs(batch), logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, keep + 1].reshape(-1),
                           ignore_index=data.IGNORE_INDEX)


def probe_forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval-mode logits of ``batch`` under the training routing rule (for reload/merge/PEFT parity checks)."""
    was_training = model.training
    model.eval()
    route = sulora.prompt_route_mask(batch["attention_mask"], batch["labels"]) if "labels" in batch else batch["attention_mask"]
    with torch.no_grad(), generation_routing(model, route, cache=False):
        logits = model(**model_inputs(batch)).logits.float()
    model.train(was_training)
    return logits


# --------------------------------------------------------------------------------------------- data
def training_set(args: argparse.Namespace, encoder: data.ConversationEncoder, image_processor: Any) -> data.LlavaDataset:
    """The lazy training set: the digits tasks, or ``--data_path`` read as :class:`~mm_subspace.data.llava.CompactRecords`.

    Malformed records (structure, ``<image>`` placement, image paths and files) are all reported here, before a
    model loads (or skipped with ``--skip_bad_records``); images are decoded and records tokenized per batch.
    """
    if args.data_path is None:
        records: Any = data.digits_instruction_records("train", args.tasks, limit=args.train_limit)
    else:
        records = data.CompactRecords(args.data_path, args.image_folder, allow_outside=args.allow_outside_data)
        data.report_bad_records(records.bad, args.skip_bad_records)
    return data.LlavaDataset(records, encoder, image_processor, args.skip_bad_records)


class MicroBatchIndices:
    """The record indices of micro steps ``start .. stop - 1`` on ``rank``, in order: a ``batch_sampler`` for
    ``DataLoader`` (workers decode ahead). A function of the step only (bit-exact resume): seeded epoch
    permutations (:func:`~mm_subspace.training_utils.sample_indices`), or with ``group_by_modality_length``
    LLaVA's modality- and length-grouped order (:func:`~mm_subspace.data.llava.modality_grouped_indices`)."""

    def __init__(self, dataset: data.LlavaDataset, args: argparse.Namespace, start: int, stop: int, rank: int,
                 world: int) -> None:
        self.n, self.start, self.stop, self.rank, self.world = len(dataset), start, stop, rank, world
        self.batch, self.seed = args.train_batch_size, args.seed
        self.lengths = dataset.modality_lengths() if args.group_by_modality_length else None

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for micro_step in range(self.start, self.stop):
            if self.lengths is None:
                yield sample_indices(self.n, self.batch, micro_step, self.rank, self.world, self.seed)
            else:
                yield data.modality_grouped_indices(self.lengths, self.batch, micro_step, self.rank, self.world, self.seed)


def pixel_values(image_processor: Any) -> Any:
    """``images -> pixel_values [n, 3, H, W]`` through ``image_processor`` (evaluation batches)."""
    return lambda images: image_processor(images, return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with ``--eval_only`` evaluate). Returns ``{"output_dir", "global_step", "final_loss",
    "final_aux_loss", "digest", "eval", "peft_exported", "resumed_from", "trainable_parameters"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    resuming = CheckpointManager(output_dir, args.adapter).resolve(args.resume_from_checkpoint)
    args.mixed_precision = resume_mixed_precision(resuming, args.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" or args.eval_only else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # vision_feature_layer=-2 leaves the last vision layer (and its adapters) without gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True), process_group_kwargs(args.ddp_timeout)],
    )
    apply_test_overrides(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("%s", accelerator.state)
    for note in args.default_notes:
        logger.info("real-model default: %s", note)
    rank, world = accelerator.process_index, accelerator.num_processes
    # DeepSpeed, FSDP1, FSDP2 with a 4-bit base: refused here. Sharded (FSDP2): generate() needs every rank
    sharded = check_setup(accelerator, 1, quantized=args.load_in_4bit) == "fsdp2"
    evaluating = accelerator.is_main_process or sharded
    set_seed(args.seed)
    if args.model_name_or_path:  # a local folder must hold the model, a hub id must be fetchable: one HubError
        resolve_model(args.model_name_or_path, "--model_name_or_path", "config.json")
    model_path = args.model_name_or_path or str(tiny_models.tiny_llava_path())
    base_name = args.model_name_or_path or "mm_subspace.tiny_llava (tiny-llava-digits)"

    # -- 1. data first: every bad record is reported before a model loads -----------------------------
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    encoder = data.ConversationEncoder(processor, args.model_max_length, args.conversation_template, args.system_prompt)
    pixels = pixel_values(processor.image_processor)
    if args.eval_only:
        model, processor = load_model(args, model_path, accelerator.device)
        adapter_dir = Path(args.adapter_path) if args.adapter_path else output_dir
        has_adapter = (adapter_dir / "adapter_config.json").is_file()
        if has_adapter:
            mm_subspace.load_adapter(model, adapter_dir, ADAPTER_NAME)
            args.adapter = mm_subspace.read_adapter_config(adapter_dir)["config"]["method"]
        results = run_eval(args, model, encoder, pixels, with_adapter=has_adapter) if accelerator.is_main_process else {}
        if has_adapter and accelerator.is_main_process and (adapter_dir / "README.md").is_file():
            _append_eval_to_card(adapter_dir / "README.md", results)
        return {"output_dir": output_dir, "eval": results, "global_step": 0}

    train = training_set(args, encoder, processor.image_processor)
    logger.info("%d training records (%s), read lazily with %d data-loader worker(s)", len(train),
                args.data_path or "digits tasks", args.dataloader_num_workers)
    steps_per_epoch = math.ceil(len(train) / (args.train_batch_size * world * args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        args.max_train_steps = EMBEDDED_MAX_STEPS if args.embedded_data and args.embedded_model and not args.recipe \
            else max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = int(round(args.lr_warmup_ratio * args.max_train_steps))
    if args.checkpointing_steps is None:
        args.checkpointing_steps = min(500, max(1, args.max_train_steps // 2))
    config = adapter_config(args)  # ConfigError on bad values

    manager = CheckpointManager(output_dir, args.adapter, args.checkpoints_total_limit, num_processes=world)
    # the whole checkpoint is checked now (files, method, adapter settings); a broken "latest" falls back
    resume_path, resume_state = manager.find_resumable(args.resume_from_checkpoint, ["model"], {"model": config})
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", manager.root)
    resume_step = resume_state["step"] if resume_state else 0

    # -- 2. model and adapters --------------------------------------------------------------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    model, processor = load_model(args, model_path, accelerator.device, weight_dtype)
    mm_subspace.inject(model, config, ADAPTER_NAME)  # TargetError on bad targets, before training
    if args.gradient_checkpointing and not args.load_in_4bit:  # load_4bit already enabled it
        enable_activation_checkpointing(model)
    parts = {"model": model}
    cast_trainable_params(parts.values(), torch.float32)
    trainable, total = mm_subspace.trainable_parameters(model)
    logger.info("%s adapter: %s", args.adapter, adapter_summary(parts)["model"])

    optimizer = torch.optim.AdamW(param_groups(parts, {"*": args.learning_rate}, args.adam_weight_decay),
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=args.max_train_steps * world)

    history = LossHistory()
    manager.register_hooks(accelerator, parts, base_model=base_name)
    manager.history = history  # saved as JSON in trainer_state.json (never pickled)
    skips = SkippedSteps(accelerator, args.max_skipped_steps)  # fp16: steps the loss scaler skips are not divergence
    manager.skipped = skips  # its counts too, so a resumed run keeps them
    replicate_trainable(accelerator, [model])  # FSDP2: the frozen base is sharded, adapters whole
    model_w, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    params = [p for p in model.parameters() if p.requires_grad]
    log_sharding(accelerator, [model])
    if accelerator.is_main_process and args.report_to != "none":
        tracker_cfg = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(f"llava-{args.adapter}", config=tracker_cfg)
    global_step = 0
    if resume_path is not None:
        logger.info("resuming from %s (step %d)", resume_path, resume_step)
        manager.load(accelerator, resume_path)  # runs no code from the folder
        manager.restore(resume_state)
        global_step = resume_step
    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info("***** training: %d records, %d steps (%.2f epochs), batch %d per process x %d processes x %d "
                "accumulation = %d", len(train), args.max_train_steps, args.max_train_steps / steps_per_epoch,
                args.train_batch_size, world, args.gradient_accumulation_steps, total_batch)

    pad_id = encoder.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = encoder.tokenizer.eos_token_id

    loader = iter(torch.utils.data.DataLoader(
        train, batch_sampler=MicroBatchIndices(train, args, global_step * args.gradient_accumulation_steps,
                                               args.max_train_steps * args.gradient_accumulation_steps, rank, world),
        collate_fn=functools.partial(data.collate, pad_token_id=pad_id), num_workers=args.dataloader_num_workers))

    def micro_batch(micro_step: int) -> dict[str, torch.Tensor]:  # the loader yields micro steps in this order
        return {k: v.to(accelerator.device) for k, v in next(loader).items()}

    def forward(batch: dict[str, torch.Tensor], net: Any) -> torch.Tensor:
        route = sulora.prompt_route_mask(batch["attention_mask"], batch["labels"])
        with routing(model, route, cache=False):  # the rule generate() uses too
            return supervised_loss(net, batch)

    def where_nonfinite(batch: dict[str, torch.Tensor]) -> str:
        bad = nonfinite_parameters(parts) or nonfinite_parameters(parts, grads=True)
        if bad:
            return f"adapter parameters or gradients {bad[:3]}"
        name = locate_nonfinite(parts, lambda: forward(batch, model))
        return f"the output of {name}" if name else "the loss only (every module output was finite)"

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    model_w.train()
    started, step_times = time.perf_counter(), []
    while global_step < args.max_train_steps:
        t0 = time.perf_counter()
        sums = torch.zeros(2)
        for micro in range(args.gradient_accumulation_steps):
            micro_step = global_step * args.gradient_accumulation_steps + micro
            batch = micro_batch(micro_step)
            torch.manual_seed(step_seed(args.seed, rank, micro_step))  # dropout: a function of the step only
            with accelerator.accumulate(model_w):
                loss = forward(batch, model_w)
                aux = mm_subspace.aux_loss(model)
                terms = accelerator.gather(torch.stack([loss.detach(), aux.detach().float()]).reshape(1, 2)).mean(0).cpu()
                if not skips.scaling:
                    check_finite({"loss": terms[0].item(), "aux_loss": terms[1].item()}, global_step + 1,
                                 lambda batch=batch: where_nonfinite(batch), manager.last_saved)
                sums += terms / args.gradient_accumulation_steps
                accelerator.backward(loss + aux)
                mm_subspace.aux_loss(model)  # drop terms re-recorded by gradient-checkpointing recomputation
                if accelerator.sync_gradients:
                    sync_replicated_grads(accelerator, params)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    if not skips.scaling:
                        check_finite({"grad_norm": float(grad_norm)}, global_step + 1, lambda batch=batch: where_nonfinite(batch),
                                     manager.last_saved)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    skips.update(global_step + 1, manager.last_saved)
        global_step += 1
        step_times.append(time.perf_counter() - t0)
        logs = {"loss": sums[0].item(), "aux_loss": sums[1].item(), "lr": lr_scheduler.get_last_lr()[0]}
        history.append(global_step, **logs)
        if skips.scaling:  # progress bar and trackers (not a loss series of the curve)
            logs["skipped_steps"] = skips.total
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", aux=f"{logs['aux_loss']:.3g}", lr=f"{logs['lr']:.2e}",
                             **({"skipped": skips.total} if skips.scaling else {}))
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            manager.save(accelerator, global_step)
    progress.close()
    train_seconds = time.perf_counter() - started

    # -- 3. save (rank 0): one adapter file, PEFT export, merged model, eval, curve, card ---------------
    final = unwrap(accelerator, model_w)
    digest = assert_replicas_in_sync(accelerator, {"model": final})
    logger.info("rank %d adapter digest %s", rank, digest)
    if world > 1 and accelerator.is_main_process:
        logger.info("adapters identical on all %d ranks (digest %s)", world, digest)
    probe_rows = [train[i] for i in range(min(4, len(train)))]
    probe = {k: v.to(accelerator.device) for k, v in data.collate(probe_rows, pad_id).items()}
    probe_logits = probe_forward(final, probe)
    results: dict[str, Any] = {}
    peft_note = ""
    if accelerator.is_main_process:
        mm_subspace.save_adapter(final, output_dir, ADAPTER_NAME, base_model_name_or_path=base_name)
        try:
            mm_subspace.export_peft(final, output_dir / "peft", ADAPTER_NAME, base_model_name_or_path=model_path)
            peft_note = "`peft/`: stock PEFT `PeftModel.from_pretrained(llava, 'peft')` (mixer folded into B, exact)"
        except (MergeError, ConfigError) as err:
            peft_note = f"no PEFT export: {err}"
            logger.info("%s", peft_note)
        if args.save_merged:
            from mm_subspace.pipelines.llava import save_merged_llava

            save_merged_llava(model_path, output_dir, output_dir / "merged")
    if evaluating and not args.skip_eval:  # rank 0 (the others wait up to --ddp_timeout), every rank if sharded
        results = run_eval(args, final, encoder, pixels, with_adapter=True, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        curve = save_loss_curve(history, output_dir / "loss_curve.png", f"visual instruction, {args.adapter}")
        flags = {k: v for k, v in vars(args).items() if k not in ("embedded_model", "embedded_data", "default_notes")}
        atomic_write_text(output_dir / "training_args.json", json.dumps(flags, indent=2, default=str) + "\n")
        sec_per_step = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
        _model_card(args, output_dir, history, global_step, total_batch, world, peft_note, curve, final, results,
                    trainable, sec_per_step, base_name)
        logger.info("saved %s adapter to %s", args.adapter, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"output_dir": output_dir, "global_step": global_step, "final_loss": history.last("loss"),
            "final_aux_loss": history.last("aux_loss"), "digest": digest, "eval": results,
            "peft_exported": peft_note.startswith("`peft"), "resumed_from": resume_path,
            "trainable_parameters": trainable, "total_parameters": total, "train_seconds": train_seconds,
            "probe": probe, "probe_logits": probe_logits, "skipped_steps": skips.total,
            "seconds_per_step": sorted(step_times)[len(step_times) // 2] if step_times else None}


if __name__ == "__main__":
    from mm_subspace.cli import report_errors

    raise SystemExit(report_errors("visual_instruction.py", lambda: main(parse_args())))
