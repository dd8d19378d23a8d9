"""TriLoRA (Feng et al., 2024): an SVD-shaped update ``ΔW = B · diag(e) · A`` with a trainable diagonal core e."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..bases import BaseKind
from ..config import LowRankConfig
from ..layer import LowRankAdapter
from ..registry import register_method


def init_outer_factors(adapter: LowRankAdapter) -> None:
    """Draw A (r, in) and B (out, r) both Kaiming-uniform (a=√5, LoRA's A init).

    For the core methods (TriLoRA, FLoRA) the *core* starts at zero, so step 0 equals the base;
    B must then be non-zero: with B = 0 and core = 0 every gradient of A, core and B is zero and
    nothing ever trains (the trap MoSLoRA Appendix C describes for a zero mixer).
    """
    with torch.no_grad():
        nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(adapter.lora_B, a=math.sqrt(5))


@dataclass
class TriLoRAConfig(LowRankConfig):
    """TriLoRA. See :class:`~mm_subspace.config.LowRankConfig` for the fields (incl. MPC; the survey pairs TriLoRA with MPC_o)."""

    method = "trilora"


@register_method
class TriLoRA(LowRankAdapter):
    """``ΔW x = (alpha/r) · B · diag(e) · A · x`` — the survey's ``ΔW = A·D·B`` (§4.1) in column form.

    ``lora_E`` (r,) is the diagonal core (AdaLoRA/PEFT's name). Init: e = 0, so step 0 equals the
    base; A and B are both Kaiming-uniform and non-zero, so ``∂L/∂e_i = s·(Bᵀ g)_i·(A x)_i ≠ 0``
    from the first step (and A, B receive gradient once e moves). PEFT's AdaLoRA uses the same
    pattern with A, B ~ N(0, 0.02²); we use LoRA's larger Kaiming-uniform so the core's first
    gradients are not ~1e-4 small. The core is exported folded into B (``up = B·diag(e)``).
    """

    config_class = TriLoRAConfig
    stackable = True  # inner's e is folded into up_weight, so per-row routing may stack it
    formula = "s·B·diag(e)·A, e=0 at init"
    paper = "Feng et al. 2024 (TriLoRA); survey §4.1 ΔW=ADB"

    def __init__(self, kind: BaseKind, base: nn.Module, config: TriLoRAConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        self.lora_E = nn.Parameter(torch.zeros(self.rank, **self.factory))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.lora_E, std=1.0 / math.sqrt(self.rank))

    def reset_factors(self) -> None:
        init_outer_factors(self)

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        return super().inner(h * self.lora_E)

    def up_weight(self) -> torch.Tensor:
        return self.lora_B * self.lora_E
