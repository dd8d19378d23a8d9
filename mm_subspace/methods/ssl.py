"""SSL — Scaling the Subspace of the Left singular vectors (subspace-tuning survey §3.2.2)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from ..registry import register_method
from .ia3 import ScalingAdapter


@dataclass
class SSLConfig(AdapterConfig):
    """SSL: one trainable vector over the input features. ``rank``/``alpha``/``dropout`` are unused."""

    method = "ssl"
    low_rank = False


@register_method
class SSL(ScalingAdapter):
    """``y = W · (l_in ⊙ x) + b``, i.e. ``W' = W · diag(l_in)``; ``l_in`` (in,) starts at one.

    Survey §3.2.2, Eq. (7) with D₂ = I: in the survey's row form ``x·W`` (W of shape in × out,
    W = UΣVᵀ) the input-side D₁ scales the rows of U, the left singular vectors — hence the name.
    It is (IA)³ with ``feedforward=True`` applied to any layer. The bias is not scaled. W is read
    through ``base_weight()`` (dequantised on a 4-bit base). See
    :class:`~mm_subspace.methods.ia3.ScalingAdapter` for merge (exact, bias untouched) and set_scale.
    """

    config_class = SSLConfig
    formula = "W·(l_in⊙x)+b"
    paper = "Subspace-tuning survey §3.2.2 Eq. (7), Fig. 2c"

    @classmethod
    def sides(cls, config: AdapterConfig, module_name: str) -> tuple[bool, bool]:
        return True, False
