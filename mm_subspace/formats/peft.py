"""PEFT LoRA: export (``adapter_config.json`` + ``adapter_model.safetensors``) and import.

Every method whose ΔW has the form ``scaling · up · down`` (LoRA, MoSLoRA, TS-Mixing, and the other
A·B-shaped methods) exports as an ordinary LoRA: the mixer is folded into B exactly (``up = B · M``),
so stock loaders reproduce the adapter's outputs. Methods that cannot be written as a fixed rank-r
product (SuLoRA's routed B, nonlinear MPC) raise :class:`~mm_subspace.errors.MergeError` saying why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_paths, file_errors, read_text_file, require_regular_file
from ..errors import AdapterFileError, ConfigError
from ..hub import PEFT_FILES, resolve
from ..inject import TRAINABLE_PREFIX, get_state, inject, iter_adapters, rollback, set_adapter, trainable_module_state
from ..io import FORMAT, load_tensors_into, read_tensors, save_tensors

PEFT_WEIGHTS = "adapter_model.safetensors"


def lora_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module name -> (down (r, in), up (out, r), scaling) with ``ΔW = scaling · up · down`` (mixer folded)."""
    get_state(model)
    out = {}
    for module_name, adapter in iter_adapters(model, adapter_name):
        down, up = adapter.lora_factors()
        out[module_name] = (down.detach(), up.detach(), float(adapter.scaling))
    if not out:
        raise ConfigError(f"model has no adapter named {adapter_name!r} to export")
    return out


def lora_state_dict(
    model: nn.Module, adapter_name: str = "default", fold_scale: bool = False, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """PEFT-keyed plain-LoRA tensors: ``"{prefix}{module}.lora_A.weight"`` (r, in) and ``.lora_B.weight`` (out, r).

    With ``fold_scale`` the scaling ``alpha/r`` is multiplied into B (for loaders that assume alpha = r).
    """
    state = {}
    for module_name, (down, up, scaling) in lora_factors(model, adapter_name).items():
        state[f"{prefix}{module_name}.lora_A.weight"] = down.contiguous()
        state[f"{prefix}{module_name}.lora_B.weight"] = (up * scaling if fold_scale else up).contiguous()
    return state


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    return {re.escape(name): v for name, v in values.items() if v != default}


def export_peft(
    model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default", base_model_name_or_path: str | None = None,
    *, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None, use_dora: bool = False,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads.

    The mixer is folded into ``lora_B``; rank and alpha are kept (per-module values go to PEFT's
    ``rank_pattern`` / ``alpha_pattern``), so PEFT computes exactly our ΔW. ``factors`` (default
    :func:`lora_factors`), ``extra_tensors`` (PEFT keys) and ``use_dora`` let other layouts (DoRA,
    see :func:`mm_subspace.formats.dora_peft.export_dora_peft`) reuse this writer.
    """
    from peft import LoraConfig


    factors = lora_factors(model, adapter_name) if factors is None else factors
    ranks = {name: int(down.shape[0]) for name, (down, _, _) in factors.items()}
    alphas = {name: scaling * ranks[name] for name, (_, _, scaling) in factors.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(factors),
        rank_pattern=_patterns(ranks, rank),
        alpha_pattern=_patterns(alphas, alpha),
        base_model_name_or_path=base_model_name_or_path,
        lora_dropout=float(get_state(model).configs[adapter_name].dropout),
        use_dora=use_dora,
        modules_to_save=list(get_state(model).configs[adapter_name].trainable_modules) or None,
    )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (down, up, _) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
    # fully trained modules (trainable_modules) as PEFT modules_to_save: "base_model.model.<module>.<param>"
    for key, param in trainable_module_state(model, get_state(model).configs[adapter_name]).items():
        tensors[f"base_model.model.{key.removeprefix(TRAINABLE_PREFIX)}"] = param.detach()
    tensors.update(extra_tensors or {})
    with atomic_paths(out / PEFT_WEIGHTS) as (tmp,):
        save_tensors(tensors, tmp, metadata={"format": "pt"})
    config.save_pretrained(str(out))
    return out


def read_peft_weights(folder: Path) -> dict[str, torch.Tensor]:
    st, binary = folder / PEFT_WEIGHTS, folder / "adapter_model.bin"
    if os.path.lexists(st):  # read_tensors names a FIFO/folder in its place
        return read_tensors(st)
    if os.path.lexists(binary):
        require_regular_file(binary, f"{binary} is a dangling link")
        try:  # never unpickle arbitrary objects
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterFileError(f"{binary} could not be read safely as tensors ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise AdapterFileError(f"{binary} does not hold a flat dict of tensors")
        return state
    raise AdapterFileError(f"no {PEFT_WEIGHTS} or adapter_model.bin in {folder}")


def read_peft_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a PEFT ``adapter_config.json``; an mm_subspace folder or a non-PEFT file is a clear error."""

    path = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(read_text_file(path))
    except AdapterFileError:  # a FIFO or folder in its place: the message says which
        raise
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter_config.json in {folder}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON or a huge int
        raise AdapterFileError(f"{path} is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
    except OSError as err:
        raise AdapterFileError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(cfg).__name__}")
    if cfg.get("format") == FORMAT:
        raise AdapterFileError(
            f"{folder} is an mm_subspace adapter folder (written by mm_subspace.save_adapter), not a PEFT or official "
            "MoSLoRA checkpoint: load it with mm_subspace.load_adapter(model, folder), or convert it with "
            "`mm-subspace export`"
        )
    if "peft_type" not in cfg:
        raise AdapterFileError(f"{path} has no 'peft_type': it is not a PEFT adapter config (PEFT writes one with save_pretrained)")
    return cfg


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.x.lora_A.default.weight`` -> ``x.lora_A.weight``."""
    key = key.removeprefix("base_model.model.")
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def peft_lora_fields(cfg: dict[str, Any], modules: list[str]) -> dict[str, Any]:
    """Our config fields (rank, alpha, patterns, dropout) from a PEFT LoRA ``adapter_config.json`` dict.

    ``use_rslora`` (scale alpha/√r) is converted exactly: alpha' = alpha·√r per module.
    """
    from ..methods.lora import LoraConfig

    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern = {k: int(v) for k, v in (cfg.get("rank_pattern") or {}).items()}
    alpha_pattern = {k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    if cfg.get("use_rslora"):
        config0 = LoraConfig(rank=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        alpha_pattern = {re.escape(m): config0.alpha_for(m) * config0.rank_for(m) ** 0.5 for m in modules}
    return dict(rank=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                dropout=float(cfg.get("lora_dropout", 0.0)))


@file_errors
def import_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", strict: bool = True) -> str:
    """Load a PEFT LoRA checkpoint (``adapter_config.json`` + weights) onto ``model`` as our ``lora``.

    ``use_rslora`` is converted exactly (alpha' = alpha·√r). DoRA and other PEFT variants are refused
    with the reason. ``path`` is a folder or a Hub id (as PEFT's ``from_pretrained``). Returns the adapter name.
    """
    from ..methods.lora import LoraConfig

    folder = resolve(path, PEFT_FILES)
    cfg = read_peft_config(folder)
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(f"{folder} is a {cfg.get('peft_type')!r} PEFT adapter; only LORA can be imported")
    for flag in ("use_dora", "use_qalora", "lora_bias"):
        if cfg.get(flag):
            raise AdapterFileError(f"{folder}: PEFT option {flag}=True has no plain-LoRA equivalent; import refused")
    tensors = {strip_peft_prefix(k): v for k, v in read_peft_weights(folder).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    saved = list(cfg.get("modules_to_save") or [])  # PEFT's fully trained modules -> our trainable_modules
    in_saved = lambda k: any(k.startswith(s + ".") or f".{s}." in k for s in saved)  # noqa: E731
    tensors = {f"{TRAINABLE_PREFIX}{k}" if in_saved(k) else k: v for k, v in tensors.items()}
    extra = sorted(k for k in tensors if not re.search(r"\.lora_[AB]\.weight$", k) and not k.startswith(TRAINABLE_PREFIX))
    if extra and strict:
        raise AdapterFileError(
            f"{folder} holds tensors a plain LoRA does not have: {extra[:5]} ({len(extra)} in all). "
            "A MoSLoRA checkpoint (lora_AB)? Use mm_subspace's MoSLoRA import. Or pass strict=False to skip them."
        )
    config = LoraConfig(targets=modules, trainable_modules=saved, **peft_lora_fields(cfg, modules))
    # extras stay in: with strict=False load_tensors_into logs them as ignored (never dropped silently)
    ours = {k.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B"): v for k, v in tensors.items()}
    with rollback(model):
        inject(model, config, adapter_name)
        load_tensors_into(model, adapter_name, ours, strict=strict, source=str(folder))
        set_adapter(model, adapter_name)
    return adapter_name
