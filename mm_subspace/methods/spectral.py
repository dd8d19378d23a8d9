"""Spectral Adapter (Zhang & Pilanci, 2024): tune the top-r singular vectors of W, additively or by rotation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig, check_choice
from ..registry import register_method
from .sam_parser import SVDAdapter

VARIANTS = ("additive", "rotational")


@dataclass
class SpectralConfig(AdapterConfig):
    """Spectral Adapter.

    Args:
        rank: r, how many top singular triplets of W are tuned (``rank_pattern`` works as usual).
        variant: ``"additive"`` (Spectral Adapter^A, the form the survey analyses, Eq. 32-33) or
            ``"rotational"`` (Spectral Adapter^R: r×r rotations of the top singular vectors).
        ``alpha`` is unused (the paper has no scale); ``set_scale`` still multiplies ΔW.
    """

    method = "spectral"
    variant: str = field(default="additive", metadata={"help": f"one of {VARIANTS}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("spectral: variant", self.variant, VARIANTS)


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R = (I + Q)(I − Q)⁻¹`` from the skew part ``Q = (P − Pᵀ)/2`` of ``P`` (r, r); P = 0 gives I exactly."""
    work = generator if generator.dtype == torch.float64 else generator.float()  # no half-precision solve on CPU
    skew = (work - work.T) / 2
    eye = torch.eye(work.shape[0], device=work.device, dtype=work.dtype)
    # (I + Q) and (I − Q)⁻¹ commute, so R = (I − Q)⁻¹(I + Q): one solve, no explicit inverse
    return torch.linalg.solve(eye - skew, eye + skew).to(generator.dtype)


@register_method
class Spectral(SVDAdapter):
    """Spectral Adapter on the top-r SVD ``W = U Σ Vᵀ`` taken at injection (U_r, Σ_r, V_r the top r triplets).

    ``variant="additive"`` (default) — Spectral Adapter^A, survey Eq. (32)::

        W' = [U_r + A_U, U_{n−r}] · Σ · [V_r + A_V, V_{n−r}]ᵀ
        ΔW = A_U Σ_r V_rᵀ + U_r Σ_r A_Vᵀ + A_U Σ_r A_Vᵀ

    with trainable ``delta_U`` = A_U (out, r) and ``delta_V`` = A_V (in, r), both zero at init (step
    0 = base exactly; each still gets a gradient, since ΔW is linear in either one when the other is
    zero). The survey's Eq. (33) writes the same update with Σ, U, V un-truncated and the last term
    as ``AΣB``; the precise form is the one above (Σ_r, and A_Vᵀ). Computed without cancellation as
    ``ΔW = [A_U Σ_r | U_r Σ_r] · [(V_r + A_V)ᵀ ; A_Vᵀ]`` — an exact rank-2r LoRA (the paper's "double
    rank capacity"), which is what plain-LoRA export writes (rank 2r).

    ``variant="rotational"`` — Spectral Adapter^R::

        W' = [U_r R_U, U_{n−r}] · Σ · [V_r R_V, V_{n−r}]ᵀ,   ΔW = U_r (R_U Σ_r R_Vᵀ − Σ_r) V_rᵀ

    with R = Cayley(P) = (I + Q)(I − Q)⁻¹, Q = (P − Pᵀ)/2, orthogonal for any trainable generator
    ``rotation_U``/``rotation_V`` = P (r, r), zero at init (R = I, step 0 = base exactly). Cayley maps
    onto the rotations without −1 eigenvalues (det +1). Plain-LoRA export: exact, rank r
    (``down = V_rᵀ``, ``up = U_r (R_U Σ_r R_Vᵀ − Σ_r)``).

    Both: merge is exact (``W ± ΔW``); the update is added to the base output, never rebuilt from
    the SVD; the frozen, saved buffers are ``svd_U`` (out, r), ``svd_S`` (r,), ``svd_Vh`` (r, in).
    """

    config_class = SpectralConfig
    formula = "[U_r+A_U,·]Σ[V_r+A_V,·]ᵀ  |  [U_r R_U,·]Σ[V_r R_V,·]ᵀ"
    paper = "Zhang & Pilanci 2024 (Spectral Adapter); survey §5 Eq. (32)-(33)"

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        r = config.rank_for(module_name)
        super().__init__(kind, base, config, module_name, r)
        dd, random = self.factory, not config.init_weights
        if config.variant == "additive":
            self.delta_U = nn.Parameter(self._init(torch.zeros(self.out_features, r, **dd), random))
            self.delta_V = nn.Parameter(self._init(torch.zeros(self.in_features, r, **dd), random))
        else:
            self.rotation_U = nn.Parameter(self._init(torch.zeros(r, r, **dd), random))
            self.rotation_V = nn.Parameter(self._init(torch.zeros(r, r, **dd), random))

    @staticmethod
    def _init(tensor: torch.Tensor, random: bool) -> torch.Tensor:
        return tensor.normal_(0.0, 0.1) if random and not tensor.is_meta else tensor

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = self.svd_U, self.svd_S, self.svd_Vh
        if self.config.variant == "additive":
            up = torch.cat([self.delta_U * s, u * s], dim=1)
            down = torch.cat([vh + self.delta_V.T, self.delta_V.T], dim=0)
            return down, up
        core = cayley(self.rotation_U) @ torch.diag(s) @ cayley(self.rotation_V).T - torch.diag(s)
        return vh, u @ core
