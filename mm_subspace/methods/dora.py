"""DoRA (Liu et al., 2024): magnitude × row-normalised (W + ΔW); optionally with a MoSLoRA mixer in ΔW."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, check_choice
from ..errors import MergeError
from ..layer import Adapter, LowRankAdapter
from ..registry import register_method
from .moslora import MIXER_INITS, init_mixer


@dataclass
class DoRAConfig(AdapterConfig):
    """DoRA.

    Args:
        mixer_init: ``None`` (default) = plain DoRA, ``ΔW = s·B·A``. A MoSLoRA init name (one of
            ``moslora.MIXER_INITS``) = MoSLoRA + DoRA: a trainable r×r mixer M, ``ΔW = s·B·M·A``,
            used both inside the norm and on the low-rank path (the official MoSLoRA code drops the
            mixer when DoRA is on; here it is always applied).
    """

    method = "dora"
    has_magnitude = True
    mixer_init: str | None = field(default=None, metadata={"help": f"None (plain DoRA) or one of {MIXER_INITS}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("dora: mixer_init (None = plain DoRA)", self.mixer_init, MIXER_INITS, allow_none=True)


@register_method
class DoRA(LowRankAdapter):
    """``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row`` with ``ΔW = s·B·A`` (or ``s·B·M·A`` with a mixer).

    DoRA Eq. (5) (survey §5 Eq. 27). In PEFT's ``nn.Linear`` layout W is (out, in) and DoRA's
    "column-wise" norm is the norm of each output row over the input dimension, so
    ``m`` (out,) = ``magnitude``, initialised to ‖W + ΔW‖ per row (= ‖W‖ with B = 0, so step 0 is
    the base exactly). As DoRA §4.3 advises and PEFT does, the norm is detached (a constant in
    backward). The forward is PEFT 0.21's ``DoraLinearLayer``::

        y = base + (m/‖W+ΔW‖ − 1) ⊙ (base − b) + (m/‖W+ΔW‖) ⊙ s·B(M(A·drop(x)))

    (with active dropout, ``base − b`` is replaced by ``W·drop(x)``); the bias is not rescaled.
    Given the same W, A, B and m the outputs and merged weights equal PEFT's ``use_dora=True``.

    Merge rewrites W as ``W'`` above (bias untouched); the per-row norm is kept for unmerge, which
    restores ``W = W' · ‖W+ΔW‖/m − ΔW``. Plain-LoRA export is refused (see ``merge_refusal``). W is
    read through ``base_weight()`` every forward (dequantised on a 4-bit base, as PEFT does).
    """

    config_class = DoRAConfig
    formula = "m⊙(W+s·B·A)/‖W+s·B·A‖_row  (+M: s·B·M·A)"
    paper = "Liu et al. 2024 (DoRA, Eq. 5, §4.3); survey §5 Eq. (27)"
    merge_refusal = (
        "DoRA's update m/‖W+ΔW‖ ⊙ (W+ΔW) − W rescales every row of W, so it is not a rank-r product B·A; "
        "merge it into the base instead (mm_subspace.merge), or train plain lora/moslora for a LoRA file"
    )

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        with torch.no_grad():
            weight = kind.weight(base).to(self.lora_A.dtype)
            magnitude = self.row_norm(weight, self.low_rank_delta())
        self.magnitude = nn.Parameter(magnitude)
        self._merged_norm: torch.Tensor | None = None

    def make_mixer(self, r: int, dd: dict[str, Any]) -> torch.Tensor | None:
        return None if self.config.mixer_init is None else init_mixer(self.config.mixer_init, r, dd)

    def low_rank_delta(self) -> torch.Tensor:
        """``s·B·M·A`` (out, in), the LoRA part inside the norm."""
        return (self.up_weight() @ self.lora_A) * self.total_scale

    @staticmethod
    def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ over the input dimension, per output row (out,), detached (DoRA §4.3)."""
        return torch.linalg.norm(weight + delta.detach(), dim=1).detach()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        dtype = self.lora_A.dtype
        weight = self.base_weight().to(dtype)
        scale = (self.magnitude / self.row_norm(weight, self.low_rank_delta())).to(dtype)
        dropped = self.dropout(x.to(dtype))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base_bias()
            plain = base_out.to(dtype) if bias is None else base_out.to(dtype) - bias.to(dtype)
        else:  # PEFT: with dropout active, the rescaled term uses the dropped input
            plain = F.linear(dropped, weight)
        h = F.linear(dropped, self.lora_A)
        if self.mixer is not None:
            h = F.linear(h, self.mixer)
        low_rank = F.linear(self.inner(h) * self.total_scale, self.lora_B)
        return base_out + ((scale - 1) * plain + scale * low_rank).to(base_out.dtype)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return Adapter.lora_factors(self)

    def delta_weight(self) -> torch.Tensor:
        return Adapter.delta_weight(self)

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        magnitude = self.magnitude.detach().to(weight.dtype)
        if bool((magnitude == 0).any()):
            raise MergeError(f"cannot merge dora on {self.module_name!r}: a magnitude is 0, so unmerge could not restore W")
        delta = self.low_rank_delta().detach().to(weight.dtype)
        self._merged_norm = self.row_norm(weight, delta)
        return (magnitude / self._merged_norm)[:, None] * (weight + delta)

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        if self._merged_norm is None:
            raise MergeError(f"dora adapter on {self.module_name!r} is not merged; nothing to unmerge")
        factor = self.magnitude.detach().to(merged.dtype) / self._merged_norm.to(merged.dtype)
        self._merged_norm = None
        return merged / factor[:, None] - self.low_rank_delta().detach().to(merged.dtype)
