"""The DreamBooth script's optimizer: AdamW (torch or bitsandbytes 8-bit) or Prodigy, with diffusers' lr rules."""

from __future__ import annotations

import argparse
import logging

import torch

from mm_subspace.compat import require
from mm_subspace.training_utils import param_groups

logger = logging.getLogger(__name__)


def make_optimizer(args: argparse.Namespace, parts: dict[str, torch.nn.Module], world: int) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit) or Prodigy over one group per part, with diffusers' lr rules:
    ``--scale_lr`` scales ``--learning_rate`` only; Prodigy uses ``--learning_rate`` for every group."""
    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * world
    text_lr = args.text_encoder_lr
    if args.optimizer == "prodigy":
        if args.train_text_encoder and text_lr != lr:
            logger.warning("--optimizer prodigy: text encoders use --learning_rate %g too (Prodigy adapts one step "
                           "size; diffusers does the same), not --text_encoder_lr %g", lr, text_lr)
        text_lr = lr
        if lr <= 0.1:
            logger.warning("--optimizer prodigy with --learning_rate %g: Prodigy estimates the step size itself and "
                           "expects a learning rate around 1.0", lr)
    groups = param_groups(parts, {"unet": lr, "*": text_lr},
                          {"unet": args.adam_weight_decay, "*": args.adam_weight_decay_text_encoder})
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "prodigy":
        prodigyopt = require("prodigyopt", "--optimizer prodigy", "train")
        return prodigyopt.Prodigy(groups, betas=betas, beta3=args.prodigy_beta3, eps=args.adam_epsilon,
                                  decouple=args.prodigy_decouple, use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    if args.use_8bit_adam:
        bnb = require("bitsandbytes", "--use_8bit_adam", "quant")
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=args.adam_epsilon)
    return torch.optim.AdamW(groups, betas=betas, eps=args.adam_epsilon)
