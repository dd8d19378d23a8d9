"""(IA)³ (Liu et al., 2022): rescale a layer's output (or, for feedforward layers, its input) by a learned vector.

Also home of :class:`ScalingAdapter`, the shared math of the survey's subspace-scaling family
(§3.2.2, Eq. 7: ``Ŵ = D₁ W D₂``): (IA)³ scales one side, SSL (``ssl.py``) the input side, SSB
(``ssb.py``) both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, MergeError
from ..layer import Adapter
from ..registry import register_method


class ScalingAdapter(Adapter):
    """``y = l_out ⊙ (W · (l_in ⊙ x) + b)``, i.e. ``W' = diag(l_out) · W · diag(l_in)``, ``b' = l_out ⊙ b``.

    Survey §3.2.2, Eq. (7) in column form (the survey's row form ``x·W`` with W (in, out) writes
    ``D₁ W D₂``; D₁ acts on the input, D₂ on the output). Subclasses pick the sides through
    :meth:`sides`; a side that is not scaled has no parameter. Vectors start at one, so step 0 is
    the base exactly (``init_weights=False`` draws them uniformly in [0.5, 1.5], for tests).

    Output scaling multiplies the base output, bias included (as PEFT's (IA)³ does for non-feedforward
    layers), and needs no access to W. Input scaling adds ``W · ((l_in − 1) ⊙ x)`` to the base
    output (one extra matmul; W read through :meth:`base_weight`, so a 4-bit base is dequantised), so
    the bias is not scaled, as when PEFT feeds ``l ⊙ x`` to the base layer. There is no dropout path.

    Merge writes ``W'`` and ``b'`` (exact up to rounding); unmerge divides them out again, so merge
    refuses vectors with a zero entry. ``set_scale(s)`` uses ``1 + s · (l − 1)``. Plain-LoRA export is
    refused: ``ΔW = (l_out l_inᵀ − 1) ⊙ W`` is full rank in general.

    Parameters: ``l_in`` (in,) and/or ``l_out`` (out,).
    """

    merge_refusal = (
        "the update (l_out·l_inᵀ − 1) ⊙ W rescales W entrywise and is full rank in general, so it has no "
        "exact rank-r LoRA factors; merge it into the base instead (mm_subspace.merge)"
    )

    def __init__(self, kind: Any, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        scale_in, scale_out = self.sides(config, module_name)
        self.l_in = self._vector(self.in_features) if scale_in else None
        self.l_out = self._vector(self.out_features) if scale_out else None

    @classmethod
    def sides(cls, config: AdapterConfig, module_name: str) -> tuple[bool, bool]:
        """(scale the input, scale the output) of module ``module_name`` under ``config``."""
        return True, True

    def _vector(self, n: int) -> nn.Parameter:
        vec = torch.ones(n, **self.factory)
        if not self.config.init_weights and not vec.is_meta:
            with torch.no_grad():
                vec.uniform_(0.5, 1.5)
        return nn.Parameter(vec)

    def _effective(self, vec: torch.Tensor | None) -> torch.Tensor | None:
        """``1 + s · (l − 1)`` for ``set_scale(s)`` (``l`` itself at s = 1)."""
        if vec is None or self.user_scale == 1.0:
            return vec
        return 1 + self.user_scale * (vec - 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        out = base_out
        l_in, l_out = self._effective(self.l_in), self._effective(self.l_out)
        if l_in is not None:
            weight = self.base_weight()
            shifted = x.to(l_in.dtype) * (l_in - 1)
            out = out + F.linear(shifted.to(weight.dtype), weight).to(out.dtype)
        if l_out is not None:
            out = (out * l_out).to(out.dtype)
        return out

    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        l_in, l_out = self._effective(self.l_in), self._effective(self.l_out)
        for vec in (l_in, l_out):
            if vec is not None and bool((vec == 0).any()):
                raise MergeError(
                    f"cannot merge {self.method!r} on {self.module_name!r}: a scaling vector has a zero entry, so "
                    "unmerge could not divide it out again; keep the adapter unmerged (or merge_and_unload a copy)"
                )
        return l_in, l_out

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        l_in, l_out = self._scales()
        if l_in is not None:
            weight = weight * l_in.detach().float()
        if l_out is not None:
            weight = weight * l_out.detach().float()[:, None]
        return weight

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        l_in, l_out = self._scales()
        if l_out is not None:
            merged = merged / l_out.detach().float()[:, None]
        if l_in is not None:
            merged = merged / l_in.detach().float()
        return merged

    def merge_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias if bias is None or self.l_out is None else bias * self._scales()[1].detach().float()

    def unmerge_bias(self, merged: torch.Tensor | None) -> torch.Tensor | None:
        return merged if merged is None or self.l_out is None else merged / self._scales()[1].detach().float()


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³.

    Args:
        feedforward: which targets are feedforward layers (PEFT's ``feedforward_modules``). On
            those the input is scaled, ``y = W (l ⊙ x) + b`` — the paper's ``l_ff ⊙ γ(W₁ x)`` seen
            from the second feedforward layer (``down_proj``/``fc2``); on the others the output,
            ``y = l ⊙ (W x + b)`` (keys, values). ``False`` (default) = none, ``True`` = all, or a
            list of module names, each matched exactly or as a dotted suffix (like ``targets``).
        ``rank``/``alpha``/``dropout`` are unused.
    """

    method = "ia3"
    low_rank = False
    feedforward: bool | list[str] = field(
        default=False, metadata={"help": "True/False for all targets, or names/suffixes of the feedforward ones"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward, tuple):
            self.feedforward = list(self.feedforward)
        if not isinstance(self.feedforward, bool) and not (
            isinstance(self.feedforward, list) and all(isinstance(n, str) for n in self.feedforward)
        ):
            raise ConfigError(
                f"ia3: feedforward must be True, False or a list of module names, got {self.feedforward!r}; "
                "e.g. feedforward=['down_proj']"
            )

    def is_feedforward(self, module_name: str) -> bool:
        """Whether ``module_name`` gets input-side scaling."""
        if isinstance(self.feedforward, bool):
            return self.feedforward
        return any(module_name == n or module_name.endswith("." + n) for n in self.feedforward)


@register_method
class IA3(ScalingAdapter):
    """(IA)³: ``y = l_out ⊙ (W x + b)``, or with ``feedforward=True`` ``y = W (l_in ⊙ x) + b``.

    Liu et al. 2022, §3.3 (``l_k ⊙ K``, ``l_v ⊙ V``, ``l_ff ⊙ γ(W₁x)``); survey §3.2.2: ``l ⊙ W = W D₂``
    scales the subspace of the right singular vectors. Same math and parameter shapes (flattened) as
    PEFT 0.21's ``IA3`` ``Linear``: output scaling includes the bias, input scaling does not, and
    merge scales the bias only for non-feedforward layers. See :class:`ScalingAdapter`.
    """

    config_class = IA3Config
    formula = "l⊙(W·x+b)  |  ff: W·(l⊙x)+b"
    paper = "Liu et al. 2022 ((IA)³, §3.3); survey §3.2.2 Eq. (7)"

    @classmethod
    def sides(cls, config: AdapterConfig, module_name: str) -> tuple[bool, bool]:
        feedforward = config.is_feedforward(module_name)
        return feedforward, not feedforward
