"""BitFit (Ben Zaken et al., 2022): train only a bias, ``y = W x + b + Δb``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig
from ..layer import Adapter
from ..registry import register_method


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit. ``rank``/``alpha``/``dropout`` are unused (there is no low-rank factor and no input path)."""

    method = "bitfit"
    low_rank = False


@register_method
class BitFit(Adapter):
    """``y = W x + b + Δb`` with a trainable bias shift Δb (out,), initialised to zero (step 0 = base).

    BitFit trains the bias terms of the frozen model (survey §3.3.1, Eq. 8-9: the last row of the
    augmented weight ``[W; bᵀ]``). We keep the base bias frozen and train an additive shift
    ``lora_bias`` instead, so the base is untouched until merge, several BitFit adapters can coexist
    and per-row routing works; ``b + Δb`` is exactly the bias BitFit would have trained. It also
    works on layers built without a bias (``bias=False``): there Δb is the whole bias.

    Merge folds Δb into the base bias (creating one on a bias-less layer; unmerge removes it again)
    and leaves W untouched, so a 4-bit W is never re-quantised. There is no ΔW, so no plain-LoRA
    export. ``set_scale`` multiplies Δb.
    """

    config_class = BitFitConfig
    merges_weight = False
    merge_refusal = "BitFit changes only the bias; there is no weight update to export as a LoRA"
    formula = "W·x + b + Δb"
    paper = "Ben Zaken et al. 2022 (BitFit); survey §3.3.1 Eq. (8)-(9)"

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        shift = torch.zeros(self.out_features, **self.factory)
        if not config.init_weights and not shift.is_meta:  # random start, for tests
            shift.normal_(0.0, 0.1)
        self.lora_bias = nn.Parameter(shift)

    def bias_shift(self) -> torch.Tensor:
        """Δb (out,), scaled by ``set_scale``."""
        return self.lora_bias * self.user_scale

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        return base_out + self.bias_shift().to(base_out.dtype)

    def merge_bias(self, bias: torch.Tensor | None) -> torch.Tensor:
        shift = self.bias_shift().float()
        return shift if bias is None else bias + shift

    def unmerge_bias(self, merged: torch.Tensor | None) -> torch.Tensor | None:
        return None if merged is None else merged - self.bias_shift().float()
