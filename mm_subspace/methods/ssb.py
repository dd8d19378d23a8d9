"""SSB — Scaling the Subspace of Both left and right singular vectors (subspace-tuning survey §3.2.2)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from ..registry import register_method
from .ia3 import ScalingAdapter


@dataclass
class SSBConfig(AdapterConfig):
    """SSB: trainable vectors over the input and the output features. ``rank``/``alpha``/``dropout`` are unused."""

    method = "ssb"
    low_rank = False


@register_method
class SSB(ScalingAdapter):
    """``y = l_out ⊙ (W · (l_in ⊙ x) + b)``, i.e. ``W' = diag(l_out) · W · diag(l_in)``, ``b' = l_out ⊙ b``.

    Survey §3.2.2, Eq. (7) ``Ŵ = D₁ W D₂`` (row form; here in column form): SSL and (IA)³ at once.
    Both vectors start at one (step 0 = base). The survey's equation has no bias; we scale it with
    the output, as (IA)³ does, so SSB with ``l_in = 1`` is exactly (IA)³ and with ``l_out = 1``
    exactly SSL. W is read through ``base_weight()`` (dequantised on a 4-bit base). See
    :class:`~mm_subspace.methods.ia3.ScalingAdapter` for merge and set_scale.
    """

    config_class = SSBConfig
    formula = "l_out⊙(W·(l_in⊙x)+b)"
    paper = "Subspace-tuning survey §3.2.2 Eq. (7), Fig. 2c"
