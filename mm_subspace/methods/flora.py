"""FLoRA (Si et al., 2024): an arbitrary r×r core between A and B, ``ΔW = B · G · A``, G initialised to zero."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import LowRankConfig
from ..layer import LowRankAdapter
from ..registry import register_method
from .moslora import init_mixer
from .trilora import init_outer_factors


@dataclass
class FLoRAConfig(LowRankConfig):
    """FLoRA. See :class:`~mm_subspace.config.LowRankConfig` for the fields (incl. MPC)."""

    method = "flora"


@register_method
class FLoRA(LowRankAdapter):
    """``ΔW x = (alpha/r) · B · G · A · x`` — the survey's ``ΔW = A·G·B`` (§4.1) in column form.

    G is the trainable ``mixer`` (r, r), zero at init so step 0 equals the base. With G = 0 the
    gradients of A and B vanish at step 0 and a zero B would freeze G's too, so A and B are both
    drawn Kaiming-uniform: ``∂L/∂G = s·(Bᵀ g)(A x)ᵀ ≠ 0`` from the first step. (MoSLoRA with
    ``mixer_init="zero"`` keeps B = 0 and never trains, MoSLoRA Appendix C; this is the difference.)
    The survey ranks FLoRA's unconstrained core above the diagonal (TriLoRA/AdaLoRA) and identity
    (LoRA) ones, Fig. 4 and Proposition 2. Exported with G folded into B (``up = B·G``).
    """

    config_class = FLoRAConfig
    formula = "s·B·G·A, G=0 at init"
    paper = "Si et al. 2024 (FLoRA); survey §4.1 ΔW=AGB"

    def make_mixer(self, r: int, dd: dict[str, Any]) -> torch.Tensor:
        return init_mixer("zero" if self.config.init_weights else "kaiming_uniform", r, dd)

    def reset_factors(self) -> None:
        init_outer_factors(self)
