"""MoSLoRA (Wu et al., 2024): a learnable r×r mixer between A and B, ΔW = (alpha/r) · B · M · A."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import LowRankConfig, check_choice
from ..layer import LowRankAdapter
from ..registry import register_method

MIXER_INITS = ("orthogonal", "kaiming_uniform", "kaiming_unit", "identity", "normal", "normal_unit", "zero")


@dataclass
class MoSLoRAConfig(LowRankConfig):
    """MoSLoRA.

    Args:
        mixer_init: initialisation of the mixer M (MoSLoRA §3.2, Table 3): ``orthogonal`` (default;
            84.4 in Table 3, the paper's SDXL and Table 5 "Orth" init; every singular value 1, so
            B·M·A carries A's scale exactly), ``kaiming_uniform`` (the paper's Table 3 best, 85.6,
            and its commonsense/visual-instruction recipes: exactly the official code's
            ``kaiming_uniform_(a=√5)``, std 1/√(3r), so M shrinks A's features to ≈ 0.58× — see
            docs/methods.md, "MoSLoRA mixer scale"), ``kaiming_unit`` (``kaiming_uniform_(a=1)``:
            variance 1/r, the same distribution family at unit gain), ``identity`` (starts as LoRA;
            82.6), ``normal`` (std 1/√r, so M·A keeps A's scale),
            ``normal_unit`` (std 1: ``nn.init.normal_`` with its defaults, the commented-out option in
            the official code's init block — the paper gives no std, so Table 3's 80.7 for "Normal
            Distribution" was most likely this one), or ``zero`` — which never trains: with B = 0 and
            M = 0 every gradient of A, M and B is zero (Appendix C).
    """

    method = "moslora"
    mixer_init: str = field(default="orthogonal", metadata={"help": f"one of {MIXER_INITS}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("moslora: mixer_init", self.mixer_init, MIXER_INITS)


def init_mixer(kind: str, r: int, dd: dict[str, Any]) -> torch.Tensor:
    """An r×r mixer initialised as ``kind`` (see :class:`MoSLoRAConfig`).

    ``kaiming_uniform_(M, a)`` draws U(−b, b) with ``b = gain·√(3/r)``, ``gain = √(2/(1 + a²))``, so
    ``std = gain/√r``: a = √5 (``"kaiming_uniform"``, the official code) gives gain √(1/3) and std
    1/√(3r); a = 1 (``"kaiming_unit"``) gives gain 1 and std 1/√r, the variance that keeps ``‖M·h‖ ≈ ‖h‖``.
    """
    if kind == "identity":
        return torch.eye(r, **dd)
    mixer = torch.empty(r, r, **dd)
    if mixer.is_meta:
        return mixer
    with torch.no_grad():
        if kind == "kaiming_uniform":
            nn.init.kaiming_uniform_(mixer, a=math.sqrt(5))
        elif kind == "kaiming_unit":
            nn.init.kaiming_uniform_(mixer, a=1.0)
        elif kind == "orthogonal":
            # orthogonal_ needs a QR decomposition, unavailable for half types on CPU: draw in float32
            mixer.copy_(nn.init.orthogonal_(torch.empty(r, r, device=mixer.device)))
        elif kind == "normal":
            nn.init.normal_(mixer, std=1.0 / math.sqrt(r))
        elif kind == "normal_unit":
            nn.init.normal_(mixer, std=1.0)
        else:
            nn.init.zeros_(mixer)
    return mixer


@register_method
class MoSLoRA(LowRankAdapter):
    """``ΔW x = (alpha/r) · B · M · A · x`` with a trainable mixer M (r, r) — MoSLoRA Eq. (7).

    M fuses all r² rank-1 sub-spaces A_i B_j (Table 2). It costs r² extra parameters per layer:
    40,960 on LLaMA-3-8B at r=16 on q,k,v,up,down (Table 4: 28.3M → 28.4M).
    """

    config_class = MoSLoRAConfig
    formula = "s·B·M·A"
    paper = "Wu et al. 2024, MoSLoRA Eq. (7), Table 3-4"

    def make_mixer(self, r: int, dd: dict[str, Any]) -> torch.Tensor:
        return init_mixer(self.config.mixer_init, r, dd)
