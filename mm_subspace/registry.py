"""Registry of adapter methods (timm-style decorator registry).

A method is one file in :mod:`mm_subspace.methods` holding a config dataclass and an adapter class,
registered with :func:`register_method`. Dispatch everywhere goes through :func:`get_method`; there is
no if/elif on method names.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .layer import Adapter

METHODS: dict[str, type[Adapter]] = {}
_LOADED = False


def register_method(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register an :class:`~mm_subspace.layer.Adapter` subclass under ``cls.config_class.method``."""
    name = cls.config_class.method
    if not name:
        raise ConfigError(f"{cls.__name__}.config_class must set a non-empty `method` name")
    if name in METHODS and METHODS[name] is not cls:
        raise ConfigError(f"method {name!r} is registered twice ({METHODS[name].__name__} and {cls.__name__})")
    cls.method = name
    METHODS[name] = cls
    return cls


def _load_all() -> None:
    """Import every module of :mod:`mm_subspace.methods` once, so each registers itself."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    pkg = importlib.import_module("mm_subspace.methods")
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"mm_subspace.methods.{info.name}")


def get_method(name: str) -> type[Adapter]:
    """Return the adapter class registered as ``name``; unknown names get a "did you mean" error."""
    _load_all()
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), METHODS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"unknown adapter method {name!r}.{hint} Available methods: {', '.join(sorted(METHODS))} "
            "(see mm_subspace.list_methods())."
        ) from None


def list_methods(pattern: str = "*") -> list[str]:
    """Names of registered methods matching a glob ``pattern`` (``list_methods("*lora")``)."""
    _load_all()
    return sorted(n for n in METHODS if fnmatch.fnmatch(n, pattern))
