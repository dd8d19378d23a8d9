"""DoRA in PEFT's ``use_dora=True`` layout (``lora_A``, ``lora_B`` = B·M, ``lora_magnitude_vector``), and
the formats that cannot hold DoRA's magnitude (kohya) refusing it with the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import file_errors
from ..errors import AdapterFileError, ConfigError
from ..hub import PEFT_FILES, resolve
from ..inject import iter_adapters
from .common import inject_and_load, modules_of, peft_tensors
from .peft import export_peft, peft_lora_fields, read_peft_config, read_peft_weights


def dora_magnitudes(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Module name -> DoRA magnitude (out,) for every adapter that has one (empty for non-DoRA adapters)."""
    return {name: a.magnitude for name, a in iter_adapters(model, adapter_name) if isinstance(getattr(a, "magnitude", None), torch.Tensor)}


def dora_factors(
    model: nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """DoRA in PEFT's ``use_dora=True`` layout: ``{module: (lora_A (r, in), B·M (out, r), scaling)}`` and
    ``{module: magnitude (out,)}``.

    DoRA Eq. (5): ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖``, the norm taken per output row of the (out, in)
    weight — the axis of PEFT's ``lora_magnitude_vector`` and of our ``magnitude``. With a MoSLoRA
    mixer ``ΔW = s·(B·M)·A`` both inside the norm and on the low-rank path, so folding M into B is exact.

    Raises:
        ConfigError: no adapter, a non-DoRA adapter among them, or a magnitude on another axis.
    """
    magnitudes = dora_magnitudes(model, adapter_name)
    adapters = dict(iter_adapters(model, adapter_name))
    if not adapters:
        raise ConfigError(f"model has no adapter named {adapter_name!r} to export")
    plain = sorted(set(adapters) - set(magnitudes))
    if plain:
        raise ConfigError(f"{plain[:3]} are {adapters[plain[0]].method} adapters, not DoRA; export them as plain LoRA")
    factors = {}
    for name, adapter in adapters.items():
        if tuple(magnitudes[name].shape) != (adapter.out_features,):
            raise ConfigError(
                f"{name!r}: DoRA magnitude has shape {tuple(magnitudes[name].shape)}, not one value per output row "
                f"({adapter.out_features},) as PEFT's lora_magnitude_vector; refusing to write it on another axis"
            )
        factors[name] = (adapter.lora_A.detach(), adapter.up_weight().detach(), float(adapter.scaling))
    return factors, {name: m.detach() for name, m in magnitudes.items()}


DORA_REFUSAL = {
    "kohya": (
        "kohya/LyCORIS files store DoRA's magnitude as `dora_scale`, whose axis depends on the trainer (one "
        "value per input column, 1×in, or per output row, out×1 — LyCORIS' wd_on_out), and diffusers' SDXL "
        "loader drops dora_scale with a warning"
    ),
}


def refuse_dora(model: nn.Module, adapter_name: str, fmt: str) -> None:
    """Raise :class:`ConfigError` with the reason if ``model``'s adapter is DoRA and ``fmt`` cannot hold it."""
    found = dora_magnitudes(model, adapter_name)
    if found:
        raise ConfigError(
            f"cannot export DoRA adapter {adapter_name!r} ({len(found)} modules) to the {fmt} format: {DORA_REFUSAL[fmt]}. "
            "mm_subspace's DoRA keeps one magnitude per output row (DoRA Eq. 5, PEFT's axis): export it with "
            "export_dora_peft (PEFT use_dora=True layout), export_diffusers (diffusers reads the same layout), "
            "or merge it into the base model"
        )


def export_dora_peft(
    model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> Path:
    """Write our ``dora`` in PEFT's ``use_dora=True`` layout: ``lora_A`` (r, in), ``lora_B`` = B·M (out, r),
    ``lora_magnitude_vector`` (out,).

    DoRA Eq. (5): ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖``, the norm taken per output row of the (out, in)
    weight — the axis of PEFT's ``lora_magnitude_vector`` and of our ``magnitude``, so the tensor is
    copied as is. With a MoSLoRA mixer, ``ΔW = s·(B·M)·A`` both inside the norm and on the low-rank
    path, so folding M into B is exact. ``PeftModel.from_pretrained`` reproduces the outputs.
    """
    factors, magnitudes = dora_factors(model, adapter_name)
    extra = {f"base_model.model.{name}.lora_magnitude_vector": m for name, m in magnitudes.items()}
    return export_peft(model, save_directory, adapter_name, base_model_name_or_path,
                       factors=factors, extra_tensors=extra, use_dora=True)


_PEFT_DORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")


@file_errors
def import_dora_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", strict: bool = True) -> str:
    """Load a PEFT ``use_dora=True`` LoRA checkpoint (folder or Hub id) onto ``model`` as our ``dora`` (magnitude per output row)."""
    from ..methods.dora import DoRAConfig

    folder = resolve(path, PEFT_FILES)
    cfg = read_peft_config(folder)
    if cfg.get("peft_type") != "LORA" or not cfg.get("use_dora"):
        raise AdapterFileError(f"{folder} is not a PEFT DoRA checkpoint (peft_type LORA with use_dora=true); "
                               "use mm_subspace.import_peft for plain LoRA")
    ours = peft_tensors(read_peft_weights(folder), folder, _PEFT_DORA_KEY, "a DoRA adapter's", strict)
    modules = modules_of(ours)
    return inject_and_load(model, DoRAConfig(targets=modules, **peft_lora_fields(cfg, modules)), ours, adapter_name, strict, folder)
