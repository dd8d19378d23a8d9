"""SAM-PARSER (Peng et al., 2024): train the singular values of W, from its SVD computed at injection.

Also home of :class:`SVDAdapter`, the shared base of the methods built on the SVD of the frozen
weight (``sam_parser``, ``svdiff``, ``spectral``): SVD at injection, frozen singular vectors stored as
buffers, and ``ΔW = up · down`` from :meth:`SVDAdapter.lora_factors` for forward, merge and export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..layer import Adapter
from ..registry import register_method


def top_svd(weight: torch.Tensor, k: int, dd: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` thin SVD ``W ≈ U · diag(S) · Vh`` of a dense (out, in) weight: U (out, k), S (k,), Vh (k, in).

    Computed in float32 (float64 kept as is) on the weight's device, singular values in descending
    order, then cast to ``dd`` (the adapter's device/dtype). Works on the meta device (shapes only).
    """
    work = weight.detach()
    work = work if work.dtype == torch.float64 else work.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u[:, :k].to(**dd).contiguous(), s[:k].to(**dd).contiguous(), vh[:k].to(**dd).contiguous()


class SVDAdapter(Adapter):
    """Base for adapters built on the SVD ``W = U · diag(S) · Vh`` of the frozen weight, taken at injection.

    The top-``k`` singular triplets are stored as frozen, persistent buffers ``svd_U`` (out, k),
    ``svd_S`` (k,), ``svd_Vh`` (k, in), so a saved adapter reloads bit-exactly (no SVD recomputed
    against a possibly different W). W is read as the base kind gives it (dequantised on a 4-bit
    base). The update is added to the base output — never as a reconstruction ``U S' Vh`` — so
    step 0 equals the base exactly even though ``U diag(S) Vh`` is only W up to rounding.

    Subclasses implement :meth:`lora_factors` (``ΔW = up · down``, exact); forward, merge (W ± ΔW) and
    plain-LoRA export all use it. ``alpha`` is ignored (scaling 1, as in the papers); ``set_scale``
    multiplies ΔW.
    """

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str, k: int) -> None:
        super().__init__(kind, base, config, module_name)
        self.scaling = 1.0
        u, s, vh = top_svd(kind.weight(base), k, self.factory)
        self.register_buffer("svd_U", u)
        self.register_buffer("svd_S", s)
        self.register_buffer("svd_Vh", vh)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        down, up = self.lora_factors()
        h = F.linear(self.dropout(x.to(down.dtype)), down) * self.total_scale
        return base_out + F.linear(h, up).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        down, up = self.lora_factors()
        return (up @ down) * self.total_scale


class SingularValueAdapter(SVDAdapter):
    """``ΔW = U · diag(d) · Vh`` over all k = min(in, out) singular triplets.

    Subclasses define ``shift() -> d`` (k,): the new singular values minus S.
    """

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        k = min(kind.in_features(base), kind.out_features(base))
        super().__init__(kind, base, config, module_name, k)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.svd_Vh, self.svd_U * self.shift()


@dataclass
class SAMParserConfig(AdapterConfig):
    """SAM-PARSER: all min(in, out) singular values train. ``rank``/``alpha`` are unused."""

    method = "sam_parser"
    low_rank = False


@register_method
class SAMParser(SingularValueAdapter):
    """``W' = U · diag(σ) · Vh`` with trainable singular values σ (k,), initialised to S (k = min(in, out)).

    Survey §3.1, Eq. (4) ``W* = U Σ* Vᵀ`` (Mode 1, singular value adjustment); Peng et al. 2024
    reconstruct the parameter space of the frozen SAM neck from its SVD and train the
    coefficients. Implemented as ``y = W x + b + U · diag(σ − S) · Vh · x`` so step 0 is the base
    exactly. Trainable: ``sigma``; frozen buffers ``svd_U``, ``svd_S``, ``svd_Vh`` (they are saved,
    so a file holds ≈ (in + out) · k values per layer — the method's real cost on disk).

    Merge: exact (``W ± ΔW``). Plain-LoRA export: exact, rank k = min(in, out)
    (``down = Vh``, ``up = U · diag(σ − S)``).
    """

    config_class = SAMParserConfig
    formula = "U·diag(σ)·Vᵀ, σ₀ = Σ"
    paper = "Peng et al. 2024 (SAM-PARSER); survey §3.1 Eq. (4)"

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        sigma = self.svd_S.clone()
        if not config.init_weights and not sigma.is_meta:
            sigma.mul_(torch.empty_like(sigma).uniform_(0.5, 1.5))
        self.sigma = nn.Parameter(sigma)

    def shift(self) -> torch.Tensor:
        return self.sigma - self.svd_S
