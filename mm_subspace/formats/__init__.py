"""Adapter file formats, one module each, and conversions between them without the base model.

* :mod:`~mm_subspace.formats.peft` — PEFT LoRA (export with the mixer folded into B, import).
* :mod:`~mm_subspace.formats.dora_peft` — DoRA in PEFT's ``use_dora=True`` layout.
* :mod:`~mm_subspace.formats.diffusers` — diffusers' SDXL ``pytorch_lora_weights.safetensors``.
* :mod:`~mm_subspace.formats.kohya` — kohya / A1111 / ComfyUI SDXL files.
* :mod:`~mm_subspace.formats.official_moslora` — the official MoSLoRA checkpoints.

Our own format (``save_adapter``/``load_adapter``) is :mod:`mm_subspace.io`. This package adds
:data:`FORMATS`, :func:`convert_adapter` and :func:`describe_adapter` (what ``mm-subspace inspect`` prints).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import atomic_write_text, file_errors
from ..config import AdapterConfig
from ..errors import AdapterFileError, ConfigError
from ..hub import ADAPTER_FILES, PIPELINE_ADAPTER_FILES, resolve
from ..io import CONFIG_NAME, read_adapter_config, save_adapter
from .common import CLASS_OF_COMPONENT, COMPONENT_OF_CLASS, load_standin, standin_model
from .diffusers import DIFFUSERS_WEIGHTS, diffusers_state_dict, export_diffusers
from .dora_peft import dora_factors, dora_magnitudes, export_dora_peft, import_dora_peft, refuse_dora
from .kohya import KOHYA_PREFIX, export_kohya, import_kohya, kohya_module_key, kohya_state_dict, sgm_unet_name
from .official_moslora import import_moslora, read_official_moslora, standin_from_official
from .peft import PEFT_WEIGHTS, export_peft, import_peft, lora_factors, lora_state_dict, read_peft_config

#: formats an adapter converts to
FORMATS = ("mm_subspace", "peft", "diffusers", "kohya")


@file_errors
def adapter_components(path: str | os.PathLike, component: str | None = None) -> dict[str | None, Path]:
    """Adapter folders of ``path``: ``{component: folder}``.

    A pipeline adapter folder holds ``unet/``, ``text_encoder/``, ``text_encoder_2/`` sub-folders
    (each saved with :func:`mm_subspace.save_adapter`, as diffusers lays out a pipeline); a single
    adapter folder maps to ``component`` or, when not given, to the SDXL component its recorded base
    class names (``None`` for other models). ``path`` may be a Hub id (only the adapter files are fetched).
    """
    folder = resolve(path, PIPELINE_ADAPTER_FILES)
    if os.path.lexists(folder / CONFIG_NAME):  # read_adapter_config names a FIFO/folder in its place
        if component is None:
            meta = read_adapter_config(folder)
            component = COMPONENT_OF_CLASS.get((meta.get("base_model") or {}).get("class"))
        elif component not in KOHYA_PREFIX:
            raise ConfigError(f"unknown SDXL component {component!r}; one of {sorted(KOHYA_PREFIX)}")
        return {component: folder}
    found = {c: folder / c for c in KOHYA_PREFIX if os.path.lexists(folder / c / CONFIG_NAME)}
    if not found:
        raise AdapterFileError(
            f"{folder} is neither an adapter folder ({CONFIG_NAME}) nor a pipeline adapter folder with "
            f"{', '.join(f'{c}/' for c in KOHYA_PREFIX)} sub-folders"
        )
    return found


def convert_models(
    models: dict[str | None, nn.Module], out: str | os.PathLike, to: str, adapter_name: str = "default",
    layers_per_block: int | None = None, base_models: dict[str | None, dict[str, Any]] | None = None,
) -> Path:
    """Write adapted ``{component: model}`` to ``out`` in format ``to`` (mm_subspace, peft, diffusers, kohya).

    ``mm_subspace`` and ``peft`` write one folder per component (``out/<component>/``, or ``out``
    itself for a single model); ``diffusers`` a folder with ``pytorch_lora_weights.safetensors``;
    ``kohya`` one ``.safetensors`` file. ``base_models`` (component -> the ``base_model`` record of
    ``adapter_config.json``) replaces what a stand-in model would record about itself.
    """
    if to not in FORMATS:
        raise ConfigError(f"unknown format {to!r}; one of {', '.join(FORMATS)}")
    out = Path(out)
    if to in ("diffusers", "kohya"):
        if None in models:
            base_class = ((base_models or {}).get(None) or {}).get("class")
            if base_class:  # a known non-SDXL model (LLaVA, LLaMA, ...): no --component can make it one
                raise ConfigError(
                    f"{to} has no format for a {base_class} adapter: {to} files hold SDXL pipeline components only "
                    f"({', '.join(sorted(KOHYA_PREFIX))}), so no --component can help. Use --to peft (stock PEFT loads it with "
                    "PeftModel.from_pretrained) or --to mm_subspace"
                )
            raise ConfigError(
                f"the {to} format is for SDXL pipelines; say which component this adapter belongs to "
                f"(component= / --component, one of {sorted(KOHYA_PREFIX)})"
            )
        if to == "kohya":
            for model in models.values():
                refuse_dora(model, adapter_name, to)
            return export_kohya(out, **models, adapter_name=adapter_name, layers_per_block=layers_per_block)
        return export_diffusers(out, **models, adapter_name=adapter_name)
    single = len(models) == 1
    for component, model in models.items():
        target = out if single else out / str(component)
        base = (base_models or {}).get(component)
        name_or_path = base.get("name_or_path") if base else None
        if to == "peft":
            (export_dora_peft if dora_magnitudes(model, adapter_name) else export_peft)(model, target, adapter_name, name_or_path)
        else:
            save_adapter(model, target, adapter_name)
            if base is not None:  # the stand-in's own class and fingerprint mean nothing: keep the real ones
                meta = json.loads((target / CONFIG_NAME).read_text(encoding="utf-8"))
                meta["base_model"] = base
                atomic_write_text(target / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return out


def refuse_overlapping_paths(source: str | os.PathLike, out: str | os.PathLike, what: str = "source") -> None:
    """Raise :class:`ConfigError` when ``out`` is ``source``, inside it, or contains it (after resolving
    symlinks): writing there would overwrite or shadow the input (``export D --to peft D``)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        relation = "is" if src == dst else "is inside" if src in dst.parents else "contains"
        raise ConfigError(
            f"the output {out} {relation} the {what} {source}: writing there would overwrite or shadow it. "
            "Choose an output path outside the input folder"
        )


@file_errors
def convert_adapter(
    path: str | os.PathLike, out: str | os.PathLike, to: str, component: str | None = None,
    layers_per_block: int | None = None, strict: bool = True,
) -> Path:
    """Convert a saved adapter (or pipeline adapter folder) to format ``to`` without loading the base model."""
    loaded = {c: load_standin(folder, strict=strict) for c, folder in adapter_components(path, component).items()}
    refuse_overlapping_paths(path, out)
    return convert_models({c: m for c, (m, _) in loaded.items()}, out, to, layers_per_block=layers_per_block,
                          base_models={c: meta.get("base_model") for c, (_, meta) in loaded.items()})


@file_errors
def convert_official_moslora(
    path: str | os.PathLike, out: str | os.PathLike, to: str = "diffusers", component: str | None = "unet",
    layers_per_block: int | None = None, strict: bool = True,
) -> Path:
    """One step: official MoSLoRA checkpoint -> ``to`` (``diffusers``/``kohya`` with the mixer folded into B,
    ``peft``, or ``mm_subspace``).

    ``component`` names the SDXL part a PEFT-layout checkpoint adapts (``None`` for a non-SDXL model,
    then only ``peft``/``mm_subspace``); a diffusers-layout checkpoint names its components itself.
    """
    if component is not None and component not in KOHYA_PREFIX:
        raise ConfigError(f"unknown SDXL component {component!r}; one of {sorted(KOHYA_PREFIX)} or None")
    loaded = standin_from_official(path, strict=strict)
    refuse_overlapping_paths(path, out)
    if None in loaded:
        model, base = loaded[None]
        loaded = {component: (model, {**base, "class": CLASS_OF_COMPONENT.get(component)})}
    return convert_models({c: m for c, (m, _) in loaded.items()}, out, to, layers_per_block=layers_per_block,
                          base_models={c: base for c, (_, base) in loaded.items()})


@dataclass(frozen=True)
class AdapterDescription:
    """One saved adapter folder: what ``mm-subspace inspect`` prints and the app's adapter table shows.

    ``rank``/``alpha`` are one number, or the sorted distinct values when patterns give modules different
    ones; ``targets`` are the adapted modules' last name parts; ``trainable_params`` counts the adapter's
    parameters (loaded onto a stand-in of the recorded shapes, no base model). ``config`` is the adapter's
    config and ``meta`` the ``adapter_config.json`` as :func:`~mm_subspace.read_adapter_config` returns it.
    """

    path: str
    method: str
    rank: int | list[int]
    alpha: float | list[float]
    modules: int
    targets: list[str]
    trainable_params: int
    base_class: str | None
    base_name_or_path: str | None
    base_fingerprint: str | None
    dtype: str | None
    config: AdapterConfig = field(repr=False, compare=False)
    meta: dict[str, Any] = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able fields (``mm-subspace inspect --json``), without ``config`` and ``meta``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("config", "meta")}


@file_errors
def describe_adapter(path: str | os.PathLike) -> AdapterDescription:
    """Describe the adapter saved in folder ``path`` (or a Hub id) (method, ranks, alphas, targets, parameters, base model)."""
    folder = resolve(path, ADAPTER_FILES)
    meta = read_adapter_config(folder)
    config: AdapterConfig = meta["config_obj"]
    model, _ = load_standin(folder)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = sorted(meta["modules"])
    ranks = sorted({config.rank_for(m) for m in modules})
    alphas = sorted({config.alpha_for(m) for m in modules})
    base = meta.get("base_model") or {}
    return AdapterDescription(
        path=str(folder),
        method=config.method,
        rank=ranks[0] if len(ranks) == 1 else ranks,
        alpha=alphas[0] if len(alphas) == 1 else alphas,
        modules=len(modules),
        targets=sorted({m.split(".")[-1] if not m.split(".")[-1].isdigit() else ".".join(m.split(".")[-2:]) for m in modules}),
        trainable_params=trainable,
        base_class=base.get("class"),
        base_name_or_path=base.get("name_or_path"),
        base_fingerprint=base.get("fingerprint"),
        dtype=meta.get("dtype"),
        config=config,
        meta=meta,
    )


__all__ = [
    "DIFFUSERS_WEIGHTS",
    "FORMATS",
    "KOHYA_PREFIX",
    "PEFT_WEIGHTS",
    "AdapterDescription",
    "adapter_components",
    "convert_adapter",
    "convert_models",
    "convert_official_moslora",
    "describe_adapter",
    "diffusers_state_dict",
    "dora_factors",
    "dora_magnitudes",
    "export_diffusers",
    "export_dora_peft",
    "export_kohya",
    "export_peft",
    "import_dora_peft",
    "import_kohya",
    "import_moslora",
    "import_peft",
    "kohya_module_key",
    "kohya_state_dict",
    "load_standin",
    "lora_factors",
    "lora_state_dict",
    "read_official_moslora",
    "read_peft_config",
    "refuse_overlapping_paths",
    "sgm_unet_name",
    "standin_from_official",
    "standin_model",
]
