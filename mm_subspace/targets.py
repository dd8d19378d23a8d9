"""Which modules of a model a target can name: the candidates and the base module under a wrapper.

Used by the injector, the presets, the adapter format and the converters (one definition, so they all
agree on what a module name means once a model has adapters). Regular expressions in targets are
compiled and matched by :mod:`mm_subspace.patterns`.
"""

from __future__ import annotations

from torch import nn

from .layer import AdapterLayer
from .patterns import compile_pattern, pattern_matches


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module names a target can match: wrapped layers count under their own name, never their insides."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        found[name] = module
        if isinstance(module, AdapterLayer):
            skip.append(name + ".")
    return found


def base_of(module: nn.Module) -> nn.Module:
    """The module an adapter wraps: ``module`` itself, or the base layer inside an :class:`AdapterLayer`."""
    return module.base_layer if isinstance(module, AdapterLayer) else module


__all__ = ["base_of", "candidate_modules", "compile_pattern", "pattern_matches"]
