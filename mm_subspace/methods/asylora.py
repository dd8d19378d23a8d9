"""AsyLoRA (Zhu et al., ICML 2024, "Asymmetry in low-rank adapters"): LoRA with one factor frozen at its random init."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bases import BaseKind
from ..config import LowRankConfig, check_choice
from ..layer import LowRankAdapter
from ..registry import register_method

FREEZE_CHOICES = ("A", "B")
#: init of the frozen A (AsyLoRA, SuLoRA): ``"orthonormal"`` as AsyLoRA's code, ``"kaiming"`` as LoRA's
A_INITS = ("orthonormal", "kaiming")


def check_a_init(method: str, value: object) -> None:
    """:class:`ConfigError` unless ``value`` is one of :data:`A_INITS`."""
    check_choice(f"{method}: a_init", value, A_INITS)


def orthonormal_rows_(weight: torch.Tensor) -> torch.Tensor:
    """Fill ``weight`` (k, d) in place with orthonormal rows: the first right singular vectors of a random matrix.

    As AsyLoRA's code (``A_init="rand"``: the first right singular vectors of ``rand(out, in) − 0.5``),
    except that the random matrix has k rows rather than ``out`` (a cheaper SVD; the result is again a
    random orthonormal frame); drawn from the global torch RNG in float32 (no SVD for half types on CPU)
    and copied into ``weight``'s dtype. For k ≤ d, ``W·Wᵀ = I``. For k > d, d rows cannot all be orthonormal in R^d: the rows come
    in blocks of d, each block orthonormal and drawn from its own random matrix, so every row still
    has unit norm. A meta tensor is left as it is.
    """
    if weight.is_meta:
        return weight
    k, d = weight.shape
    blocks = []
    for start in range(0, k, d):
        rows = min(d, k - start)
        random = torch.rand(rows, d, device=weight.device) - 0.5
        blocks.append(torch.linalg.svd(random, full_matrices=False).Vh)
    with torch.no_grad():
        weight.copy_(torch.cat(blocks))
    return weight


@dataclass
class AsyLoRAConfig(LowRankConfig):
    """AsyLoRA.

    Args:
        freeze: ``"A"`` (default; the paper's recommendation — a random A is about as good as a
            trained one, and B carries the task) or ``"B"``.
        a_init: init of A: ``"orthonormal"`` (default; orthonormal rows, the first right singular
            vectors of a random matrix, as AsyLoRA's code freezes it — row norm 1) or ``"kaiming"``
            (LoRA's Kaiming-uniform with a = √5: row norm ≈ 0.58, so B sees ≈ 0.58× the features;
            what this package used before, and what saved configs without the field load as).
            See docs/methods.md ("Frozen A").
    """

    method = "asylora"
    #: saved configs written before ``a_init`` existed were Kaiming
    absent_field_values = {"a_init": "kaiming"}
    freeze: str = field(default="A", metadata={"help": f"which factor stays frozen at init: one of {FREEZE_CHOICES}"})
    a_init: str = field(default="orthonormal", metadata={"help": f"init of A: one of {A_INITS}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("asylora: freeze", self.freeze, FREEZE_CHOICES)
        check_a_init("asylora", self.a_init)

    @property
    def frozen_factor(self) -> str:
        return self.freeze


@register_method
class AsyLoRA(LowRankAdapter):
    """``ΔW x = (alpha/r) · B · A · x`` with A (r, in) or B (out, r) frozen.

    ``freeze="A"``: A frozen at its random init — orthonormal rows (``a_init="orthonormal"``, the
    default, as AsyLoRA's code) or Kaiming-uniform (``a_init="kaiming"``) — and B = 0, trained (step
    0 equals the base). ``freeze="B"``: the roles swap — B is drawn Kaiming-uniform and frozen, A
    starts at 0 and trains, so step 0 still equals the base and A's gradient ``s·Bᵀ g xᵀ`` is
    non-zero (a zero frozen factor would make the other one's gradient vanish forever).
    """

    config_class = AsyLoRAConfig
    formula = "s·B·A, one of A/B frozen"
    paper = "Zhu et al. 2024 (AsyLoRA); SuLoRA Table 1-4 baseline"

    def __init__(self, kind: BaseKind, base: nn.Module, config: AsyLoRAConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        self.frozen_parameters = (f"lora_{config.freeze}",)

    def reset_factors(self) -> None:
        super().reset_factors()
        if self.config.a_init == "orthonormal":
            orthonormal_rows_(self.lora_A)
        if self.config.freeze == "B":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
                if self.config.init_weights:
                    nn.init.zeros_(self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen={self.frozen_parameters}, a_init={self.config.a_init}"
