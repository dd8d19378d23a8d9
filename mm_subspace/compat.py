"""Small version and optional-dependency helpers with no mm_subspace dependency but :mod:`mm_subspace.errors`.

Low in the import order on purpose: :mod:`mm_subspace.quant`, :mod:`mm_subspace.caption_data` and the
training helpers all use them.
"""

from __future__ import annotations

from typing import Any

from .errors import SubspaceError


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation (gradient) checkpointing on a transformers model.

    transformers >= 5.x names it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is a
    deprecated alias there, to be removed in v6); older releases only have the old name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class MissingExtraError(SubspaceError, ImportError):
    """An optional library a flag needs is not installed (the message names the pip extra)."""


def require(module: str, flag: str, extra: str, package: str | None = None) -> Any:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming ``flag`` and the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f'{flag} needs the `{package or module}` library: pip install "mm-subspace[{extra}]" '
            f"(or pip install {package or module})"
        ) from None


__all__ = ["MissingExtraError", "enable_activation_checkpointing", "require"]
