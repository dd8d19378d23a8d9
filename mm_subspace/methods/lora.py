"""LoRA (Hu et al., 2022): ΔW = (alpha/r) · B · A, B initialised to zero."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LowRankConfig
from ..layer import LowRankAdapter
from ..registry import register_method


@dataclass
class LoraConfig(LowRankConfig):
    """Plain LoRA. See :class:`~mm_subspace.config.LowRankConfig` for the fields (incl. MPC)."""

    method = "lora"


@register_method
class LoRA(LowRankAdapter):
    """``ΔW x = (alpha/r) · B · A · x``; A (r, in) Kaiming-uniform, B (out, r) zero.

    In the MoSLoRA view this is the fixed identity mixer (MoSLoRA Eq. 5).
    """

    config_class = LoraConfig
    formula = "s·B·A"
    paper = "Hu et al. 2022 (LoRA)"
