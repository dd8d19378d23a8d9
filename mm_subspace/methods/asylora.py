"""AsyLoRA (Zhu et al., ICML 2024, "Asymmetry in low-rank adapters"): LoRA with one factor frozen at its random init."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
from torch import nn

from ..bases import BaseKind
from ..config import LowRankConfig
from ..errors import ConfigError
from ..layer import LowRankAdapter
from ..registry import register_method

FREEZE_CHOICES = ("A", "B")


@dataclass
class AsyLoRAConfig(LowRankConfig):
    """AsyLoRA.

    Args:
        freeze: ``"A"`` (default; the paper's recommendation — a random A is about as good as a
            trained one, and B carries the task) or ``"B"``.
    """

    method = "asylora"
    freeze: str = field(default="A", metadata={"help": f"which factor stays frozen at init: one of {FREEZE_CHOICES}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze not in FREEZE_CHOICES:
            raise ConfigError(f"asylora: freeze must be 'A' or 'B', got {self.freeze!r}")


@register_method
class AsyLoRA(LowRankAdapter):
    """``ΔW x = (alpha/r) · B · A · x`` with A (r, in) or B (out, r) frozen.

    ``freeze="A"``: A Kaiming-uniform and frozen, B = 0 and trained (step 0 equals the base).
    ``freeze="B"``: the roles swap — B is drawn Kaiming-uniform and frozen, A starts at 0 and
    trains, so step 0 still equals the base and A's gradient ``s·Bᵀ g xᵀ`` is non-zero (a zero
    frozen factor would make the other one's gradient vanish forever). The paper draws the frozen
    factor at random too (it argues for a random orthogonal one); we reuse LoRA's Kaiming-uniform.
    """

    config_class = AsyLoRAConfig
    formula = "s·B·A, one of A/B frozen"
    paper = "Zhu et al. 2024 (AsyLoRA); SuLoRA Table 1-4 baseline"

    def __init__(self, kind: BaseKind, base: nn.Module, config: AsyLoRAConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        self.frozen_parameters = (f"lora_{config.freeze}",)

    def reset_factors(self) -> None:
        super().reset_factors()
        if self.config.freeze == "B":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
                if self.config.init_weights:
                    nn.init.zeros_(self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen={self.frozen_parameters}"
