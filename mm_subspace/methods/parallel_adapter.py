"""Parallel adapter (He et al., ICLR 2022, "Towards a unified view"): ``y = W x + s · B · σ(A x)``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import AdapterConfig, check_choice
from ..layer import LowRankAdapter
from ..losses import ACTIVATIONS, activation
from ..registry import register_method


@dataclass
class ParallelAdapterConfig(AdapterConfig):
    """Parallel adapter.

    Args:
        activation: the nonlinearity σ between A and B (one of ``mm_subspace.losses.ACTIVATIONS``;
            He et al. use ReLU). The scale is ``alpha / rank``: their "scaled PA" uses s = 4, i.e.
            ``alpha = 4 * rank``.
    """

    method = "parallel_adapter"
    activation: str = field(default="relu", metadata={"help": f"nonlinearity between A and B: one of {sorted(ACTIVATIONS)}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(f"{self.method}: activation", self.activation, ACTIVATIONS)


@register_method
class ParallelAdapter(LowRankAdapter):
    """``y = W x + (alpha/r) · B · σ(A x)`` — survey Eq. (25) (``xW → xW + h(xA)B``) in column form.

    A (r, in) Kaiming-uniform, B (out, r) zero, so step 0 equals the base. The nonlinearity makes
    the update input-dependent (ΔW = h(Ŵ A) B x̂†, survey Eq. 26), so it cannot be merged or
    exported as plain LoRA.
    """

    config_class = ParallelAdapterConfig
    mergeable = False
    merge_refusal = "the nonlinearity σ between A and B (survey Eq. 25) makes the update input-dependent, not a fixed ΔW"
    formula = "s·B·σ(A·x)"
    paper = "He et al. 2022 (parallel adapter); survey Eq. (25)-(26)"

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        return activation(self.config.activation)(h)
