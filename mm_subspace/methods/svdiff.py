"""SVDiff (Han et al., 2023): a trainable spectral shift of W's singular values, ``U · ReLU(Σ + δ) · Vᵀ``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig
from ..registry import register_method
from .sam_parser import SingularValueAdapter


@dataclass
class SVDiffConfig(AdapterConfig):
    """SVDiff: one shift per singular value (k = min(in, out)). ``rank``/``alpha`` are unused."""

    method = "svdiff"
    low_rank = False


@register_method
class SVDiff(SingularValueAdapter):
    """``W' = U · ReLU(Σ + δ) · Vᵀ`` with a trainable spectral shift δ (k,), initialised to zero.

    Han et al. 2023, Eq. (2); survey §5, Eq. (34)-(35): ``ΔW = U · H_Σ(δ) · Vᵀ`` with
    ``H_Σ(δ) = max(δ, −Σ)`` = ``ReLU(Σ + δ) − Σ`` (singular values never go negative). SVD of W taken at
    injection (see :class:`~mm_subspace.methods.sam_parser.SVDAdapter`); implemented as
    ``y = W x + b + U · (ReLU(Σ + δ) − Σ) · Vh · x``, so step 0 (δ = 0, ReLU(Σ) = Σ) is the base exactly.
    Trainable: ``spectral_shift``; frozen, saved buffers ``svd_U``, ``svd_S``, ``svd_Vh``.

    Merge: exact (``W ± ΔW``). Plain-LoRA export: exact, rank k = min(in, out)
    (``down = Vh``, ``up = U · diag(ReLU(Σ + δ) − Σ)``).
    """

    config_class = SVDiffConfig
    formula = "U·ReLU(Σ+δ)·Vᵀ, δ₀ = 0"
    paper = "Han et al. 2023 (SVDiff, Eq. 2); survey §5 Eq. (34)-(35)"

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        delta = torch.zeros_like(self.svd_S)
        if not config.init_weights and not delta.is_meta:
            delta.normal_(0.0, 1.0).mul_(0.5 * self.svd_S)
        self.spectral_shift = nn.Parameter(delta)

    def shift(self) -> torch.Tensor:
        return torch.relu(self.svd_S + self.spectral_shift) - self.svd_S
