"""Helpers every format shares: strict-loading reports, PEFT tensor names, inject-and-load with rollback,
stand-in models (conversions without the base model) and the SDXL pipeline components.

Conversions can run without the base model: :func:`standin_model` builds zero-cost ``nn.Linear``
stand-ins of the recorded shapes (weights are a broadcast scalar), which is all the low-rank
factors need.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import file_errors
from ..config import AdapterConfig
from ..errors import AdapterFileError
from ..hub import ADAPTER_FILES, resolve
from ..inject import inject, rollback, set_adapter
from ..io import load_adapter, load_tensors_into, module_tree, read_adapter_config

logger = logging.getLogger(__name__)


#: model class recorded in ``adapter_config.json`` -> SDXL pipeline component
COMPONENT_OF_CLASS = {
    "UNet2DConditionModel": "unet",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}


CLASS_OF_COMPONENT = {c: cls for cls, c in COMPONENT_OF_CLASS.items()}


def report_ignored(source: str, ignored: list[str], what: str = "ignored keys") -> None:
    """Log (non-strict loading) exactly which entries were skipped."""
    if ignored:
        logger.warning("loading %s non-strictly: %s (%d): %s", source, what, len(ignored), ignored)


def key_listing(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''} ({len(keys)} in all)"


def inject_and_load(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], adapter_name: str,
                     strict: bool, source: str | os.PathLike) -> str:
    """Inject ``config``, load ``tensors`` (strictly unless told), activate; on failure leave ``model`` as it was."""
    with rollback(model):
        inject(model, config, adapter_name)
        load_tensors_into(model, adapter_name, tensors, strict=strict, source=str(source))
        set_adapter(model, adapter_name)
    return adapter_name


#: PEFT-side tensor name -> ours
OUR_NAME = {
    "lora_A": "lora_A", "lora_B": "lora_B", "lora_AB": "mixer", "lora_magnitude_vector": "magnitude",
    "lora.down": "lora_A", "lora.downB": "mixer", "lora.up": "lora_B",  # diffusers' spellings (official SDXL files)
    "lora_linear_layer.down": "lora_A", "lora_linear_layer.downB": "mixer", "lora_linear_layer.up": "lora_B",
}


def peft_tensors(raw: dict[str, torch.Tensor], folder: Path, pattern: re.Pattern, what: str, strict: bool) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors (``base_model.model.<m>.<name>[.<adapter>].weight``) -> ``"<m>.<our name>"``.

    Keys ``pattern`` does not match are an error listing them, or with ``strict=False`` skipped and logged.
    """
    ours, unknown = {}, []
    for key, value in raw.items():
        m = pattern.search(key)
        if m is None:
            unknown.append(key)
            continue
        ours[f"{key[: m.start()].removeprefix('base_model.model.')}.{OUR_NAME[m[1]]}"] = value
    if unknown and strict:
        raise AdapterFileError(
            f"{folder} holds tensors that are not {what} tensors: {key_listing(sorted(unknown))}. "
            "Pass strict=False to load the rest and skip these."
        )
    report_ignored(str(folder), sorted(unknown))
    return ours


def modules_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in tensors})


def standin_model(modules: dict[str, dict[str, Any]], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A module tree with an ``nn.Linear`` of the recorded ``{"in", "out"}`` shape at every name.

    The weights are a broadcast zero scalar (no memory), enough to inject adapters, load their
    tensors and compute low-rank factors; not for running the base model.
    """
    def linear(sig: dict[str, Any]) -> nn.Linear:
        module = nn.Linear(int(sig["in"]), int(sig["out"]), bias=False, device="meta")
        module.weight = nn.Parameter(torch.zeros((), dtype=dtype).expand(int(sig["out"]), int(sig["in"])), requires_grad=False)
        return module

    return module_tree(modules, linear)


@file_errors
def load_standin(path: str | os.PathLike, strict: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved adapter folder (or Hub id) onto a stand-in of its recorded module shapes: (model, adapter_config.json)."""
    path = resolve(path, ADAPTER_FILES)
    meta = read_adapter_config(path)
    dtype = meta.get("dtype")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) else torch.float32
    model = standin_model(meta["modules"], dtype)
    load_adapter(model, path, strict=strict)
    return model, meta
