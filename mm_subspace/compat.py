"""Small version and optional-dependency helpers with no mm_subspace dependency but :mod:`mm_subspace.errors`.

Low in the import order on purpose: :mod:`mm_subspace.quant`, :mod:`mm_subspace.caption_data` and the
training helpers all use them.
"""

from __future__ import annotations

import os
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


def declare_float32_configs(folder: str | os.PathLike[str]) -> list[str]:
    """Make a saved diffusers pipeline folder load in stock diffusers without a ``torch_dtype`` argument.

    Without ``torch_dtype``, ``DiffusionPipeline.from_pretrained`` loads diffusers' own models (UNet,
    VAE) in float32 whatever their stored dtype, but transformers (>= 5) loads a model in the dtype its
    ``config.json`` names: a pipeline saved in fp16 then runs fp16 text encoders into an fp32 UNet and
    fails with ``mat1 and mat2 must have the same dtype``. This writes ``"dtype": "float32"`` into every
    transformers component's ``config.json`` (fp16 weights are upcast exactly on load; an explicit
    ``torch_dtype`` still wins). Returns the components changed.

    Raises:
        ValueError: ``folder`` has no ``model_index.json`` (not a diffusers pipeline folder).
    """
    import json
    from pathlib import Path

    root = Path(folder)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{root} has no model_index.json: not a saved diffusers pipeline folder")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    changed = []
    for name, spec in sorted(index.items()):
        config_path = root / name / "config.json"
        if not (isinstance(spec, list) and spec and spec[0] == "transformers" and config_path.is_file()):
            continue
        config = json.loads(config_path.read_text(encoding="utf-8"))
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        if config.get(key) != "float32":
            config[key] = "float32"
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            changed.append(name)
    return changed
