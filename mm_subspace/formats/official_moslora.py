"""The official MoSLoRA checkpoints (wutaiqiang/MoSLoRA, a patched PEFT 0.10).

A PEFT folder whose ``adapter_config.json`` has ``"lora_use_mixer": true`` and whose weights hold, per
module, ``lora_A.weight`` (r, in), ``lora_AB.weight`` (r, r) and ``lora_B.weight`` (out, r), keys
prefixed ``base_model.model.``. Its forward is ``lora_B(lora_AB(lora_A(dropout(x)))) * scaling``, which
is our ``moslora`` with ``mixer = lora_AB.weight``. Its SDXL script writes a diffusers
``pytorch_lora_weights.safetensors`` instead, where ``lora_AB`` became ``lora.downB`` (which stock
loaders drop with an "unexpected keys" warning); both layouts are read. Strict by default:
``lora_AB`` offered to a plain-LoRA loader, missing keys and shape mismatches are errors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import file_errors
from ..errors import AdapterFileError, ConfigError
from ..hub import PEFT_FILES, resolve
from ..io import read_tensors
from .common import CLASS_OF_COMPONENT, inject_and_load, key_listing, modules_of, peft_tensors, report_ignored, standin_model
from .diffusers import DIFFUSERS_WEIGHTS
from .kohya import KOHYA_PREFIX
from .peft import peft_lora_fields, read_peft_config, read_peft_weights

# PEFT spelling (lora_A / lora_AB / lora_B, optional adapter segment) and the diffusers spellings the
# official SDXL script writes through convert_state_dict_to_diffusers, which turns lora_AB into "downB"
_OFFICIAL_KEY = re.compile(
    r"\.(lora_AB|lora_A|lora_B|lora\.downB|lora\.down|lora\.up|lora_linear_layer\.downB|lora_linear_layer\.down"
    r"|lora_linear_layer\.up)(?:\.[A-Za-z0-9_\-]+)?\.weight$"
)


@file_errors
def read_official_moslora(
    path: str | os.PathLike, strict: bool = True
) -> dict[str | None, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Read an official MoSLoRA checkpoint: component -> (PEFT-style config, ``"<module>.<lora_A|mixer|lora_B>"`` -> tensor).

    Two layouts are read:

    * the PEFT folder of the LLM experiments (``adapter_config.json`` + ``adapter_model.safetensors``
      or ``.bin``; component ``None``);
    * the diffusers folder of the SDXL experiments (``pytorch_lora_weights.safetensors`` written by
      the official ``train_dreambooth_lora_sdxl.py``: keys ``unet.`` / ``text_encoder.`` /
      ``text_encoder_2.`` + module + ``lora.down`` / ``lora.downB`` (the mixer) / ``lora.up``, or the
      ``lora_linear_layer.*`` spelling). No alpha is recorded there: alpha = r, the rule diffusers
      applies and the script's ``lora_alpha=rank``. ``text_encoder`` names lose ``text_model.``
      (transformers 5's ``CLIPTextModel``).

    ``.bin`` weights are read with ``torch.load(weights_only=True)`` only (never unpickled). ``path`` may be a
    Hub id (only these files are downloaded).
    """
    folder = resolve(path, (*PEFT_FILES, DIFFUSERS_WEIGHTS))
    if (folder / DIFFUSERS_WEIGHTS).is_file() and not (folder / "adapter_config.json").is_file():
        parts = _read_official_diffusers(folder, strict)
    else:
        cfg = read_peft_config(folder)
        if cfg.get("peft_type") != "LORA":
            raise AdapterFileError(f"{folder} is a {cfg.get('peft_type')!r} PEFT adapter, not an (official) MoSLoRA checkpoint")
        for flag in ("use_dora", "lora_bias"):
            if cfg.get(flag):
                raise AdapterFileError(f"{folder}: option {flag}=True is not part of MoSLoRA; import refused")
        parts = {None: (cfg, peft_tensors(read_peft_weights(folder), folder, _OFFICIAL_KEY, "MoSLoRA's lora_A / lora_AB / lora_B", strict))}
    if not any(k.endswith(".mixer") for _, tensors in parts.values() for k in tensors):
        raise AdapterFileError(
            f"{folder} has no lora_AB mixer tensors: it is a plain LoRA, not MoSLoRA. Load it with "
            "mm_subspace.import_peft(model, path) (PEFT) or load_lora_weights (diffusers)"
        )
    return parts


def _read_official_diffusers(folder: Path, strict: bool) -> dict[str | None, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in read_tensors(folder / DIFFUSERS_WEIGHTS).items():
        component, _, rest = key.partition(".")
        if component in KOHYA_PREFIX:
            groups.setdefault(component, {})[rest] = value
        else:
            unknown.append(key)
    if unknown and strict:
        raise AdapterFileError(f"{folder / DIFFUSERS_WEIGHTS} holds keys of no SDXL component: {key_listing(sorted(unknown))}. "
                               "Pass strict=False to load the rest and skip these.")
    report_ignored(str(folder), sorted(unknown))
    parts = {}
    for component, raw in groups.items():
        tensors = peft_tensors(raw, folder, _OFFICIAL_KEY, "MoSLoRA's lora down / downB / up", strict)
        if component == "text_encoder":
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        ranks = {re.escape(m): int(tensors[f"{m}.lora_A"].shape[0]) for m in modules_of(tensors) if f"{m}.lora_A" in tensors}
        if not ranks:
            raise AdapterFileError(f"{folder}: no lora down (lora_A) tensor for {component}")
        cfg = {"peft_type": "LORA", "r": max(ranks.values()), "lora_alpha": max(ranks.values()),
               "rank_pattern": ranks, "alpha_pattern": {k: float(v) for k, v in ranks.items()}}
        parts[component] = (cfg, tensors)
    return parts


@file_errors
def import_moslora(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", strict: bool = True, component: str | None = None
) -> str:
    """Load an official MoSLoRA checkpoint (wutaiqiang/MoSLoRA layouts) onto ``model`` as our ``moslora``.

    ``lora_AB.weight`` becomes the mixer M, so the adapted outputs are the official ones:
    ``B(M(A x))·s`` (MoSLoRA Eq. 7). Rank/alpha (with ``rank_pattern``/``alpha_pattern`` and
    ``use_rslora``) come from ``adapter_config.json``. Missing tensors (a module without
    ``lora_AB``), unknown keys and shape mismatches raise, listing them; ``strict=False`` loads the
    rest and logs what was skipped. For an SDXL (diffusers-layout) checkpoint pass ``component``
    (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) unless it holds only one. Returns the adapter name.
    """
    from ..methods.moslora import MoSLoRAConfig

    parts = read_official_moslora(path, strict=strict)
    if component not in parts:
        if component is not None or len(parts) > 1:
            raise ConfigError(f"{path} holds MoSLoRA adapters for {sorted(map(str, parts))}; pass component= one of them")
        component = next(iter(parts))
    cfg, tensors = parts[component]
    modules = modules_of(tensors)
    config = MoSLoRAConfig(targets=modules, **peft_lora_fields(cfg, modules))
    return inject_and_load(model, config, tensors, adapter_name, strict, path)


@file_errors
def standin_from_official(path: str | os.PathLike, strict: bool = True) -> dict[str | None, tuple[nn.Module, dict[str, Any]]]:
    """An official MoSLoRA checkpoint imported onto stand-in models: component (``None`` for the PEFT
    layout) -> (model, ``base_model`` record for a saved adapter: class, name_or_path, no fingerprint)."""
    models = {}
    for component, (cfg, tensors) in read_official_moslora(path, strict=strict).items():
        shapes = {}
        for module in modules_of(tensors):
            a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2:
                raise AdapterFileError(f"{path}: module {module!r} lacks a 2-D lora_A or lora_B tensor")
            shapes[module] = {"kind": "linear", "in": int(a.shape[1]), "out": int(b.shape[0])}
        dtypes = {t.dtype for t in tensors.values()}
        model = standin_model(shapes, dtypes.pop() if len(dtypes) == 1 else torch.float32)
        import_moslora(model, path, strict=strict, component=component)
        base = {"class": CLASS_OF_COMPONENT.get(component), "name_or_path": cfg.get("base_model_name_or_path"), "fingerprint": None}
        models[component] = (model, base)
    return models
