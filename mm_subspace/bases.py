"""Readers for the base layer types an adapter can wrap.

An :class:`AdapterLayer` never touches its base module directly: it asks the module's
:class:`BaseKind` for ``in_features``/``out_features``, the dense weight (dequantised if need be) and
how to write a merged weight back. Supporting a new base type (bitsandbytes ``Linear4bit``, fused
q/k/v projections) means registering one more small reader, not subclassing the layer. This module
imports no reader of another module: :mod:`mm_subspace.inject` registers those of
:mod:`mm_subspace.fused` and :mod:`mm_subspace.quant`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .layer import AdapterLayer, ModelState

_KINDS: list[BaseKind] = []


class BaseKind(ABC):
    """How to read and write one type of base module. Subclass and :func:`register_base`."""

    #: human-readable name used in error messages and in ``adapter_config.json``
    name: str = "base"

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether this reader handles ``module``."""

    def in_features(self, module: nn.Module) -> int:
        return int(module.in_features)

    def out_features(self, module: nn.Module) -> int:
        return int(module.out_features)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight, shape (out, in), detached. Quantised kinds dequantise."""
        return module.weight.detach()

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Write a (merged) dense weight back, in the module's own dtype/format."""
        with torch.no_grad():
            module.weight.data.copy_(weight.to(module.weight.dtype))

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    def float_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype adapter parameters take by default: the weight's, or float32 if not floating."""
        dt = module.weight.dtype
        return dt if dt.is_floating_point else torch.float32

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "bias", None) is not None

    def wrap(self, module: nn.Module, state: ModelState, module_name: str) -> AdapterLayer:
        """The layer that replaces ``module`` on injection; kinds needing their own forward override it."""
        from .layer import AdapterLayer

        return AdapterLayer(module, self, state, module_name)


class LinearKind(BaseKind):
    """``torch.nn.Linear`` (and subclasses that keep its forward): y = x Wᵀ + b, W of shape (out, in)."""

    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)


def register_base(kind: BaseKind, first: bool = True) -> BaseKind:
    """Register a reader. ``first=True`` puts it before existing ones (more specific types win)."""
    if first:
        _KINDS.insert(0, kind)
    else:
        _KINDS.append(kind)
    return kind


def find_base(module: nn.Module) -> BaseKind | None:
    """The reader for ``module``, or ``None`` when its type cannot be wrapped."""
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def supported_types() -> list[str]:
    return [k.name for k in _KINDS]


register_base(LinearKind())
# the kinds in their own modules (nn.MultiheadAttention in mm_subspace.fused, bitsandbytes Linear4bit
# in mm_subspace.quant) are registered by mm_subspace.inject, which sits above all three

__all__ = ["BaseKind", "LinearKind", "register_base", "find_base", "supported_types"]
