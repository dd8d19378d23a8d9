"""Interop with other ecosystems: kohya/A1111 SDXL LoRA files and the official MoSLoRA checkpoints.

Formats handled here (PEFT and diffusers are in :mod:`mm_subspace.export`):

* **kohya / A1111 / ComfyUI (SDXL)** — one safetensors file, one entry per module::

      lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, in)
      lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight     (out, r)
      lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha              ()  = alpha
      lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight        ...
      lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight        ...

  UNet names are those of kohya's SDXL training UNet (Stability's "sgm" layout: ``input_blocks``,
  ``middle_block``, ``output_blocks``) with ``.`` replaced by ``_``; the update is
  ``ΔW = (alpha / r) · up · down``. MoSLoRA's and TS-Mixing's mixer is folded exactly into
  ``lora_up = B · M`` (MoSLoRA Eq. 7: ``B M A`` is a rank-r product), and the true alpha is written,
  so any kohya-compatible loader reproduces our outputs.

* **official MoSLoRA** (wutaiqiang/MoSLoRA, a patched PEFT 0.10) — a PEFT folder whose
  ``adapter_config.json`` has ``"lora_use_mixer": true`` and whose weights hold, per module,
  ``lora_A.weight`` (r, in), ``lora_AB.weight`` (r, r) and ``lora_B.weight`` (out, r), keys prefixed
  ``base_model.model.``. Its forward is ``lora_B(lora_AB(lora_A(dropout(x)))) * scaling``, which is
  our ``moslora`` with ``mixer = lora_AB.weight``. Its SDXL script writes a diffusers
  ``pytorch_lora_weights.safetensors`` instead, where ``lora_AB`` became ``lora.downB`` (which stock
  loaders drop with an "unexpected keys" warning); both layouts are read.

Every loader here is strict by default: unknown keys (``lora_AB`` offered to a plain-LoRA
loader, ``dora_scale``), missing keys and shape mismatches raise :class:`AdapterFileError` listing
them; ``strict=False`` loads the rest and logs exactly what was ignored.

Conversions can run without the base model: :func:`standin_model` builds zero-cost ``nn.Linear``
stand-ins of the recorded shapes (weights are a broadcast scalar), which is all the low-rank
factors need.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterFileError, ConfigError
from .export import DIFFUSERS_WEIGHTS, _read_peft_weights, dora_factors, dora_magnitudes, export_diffusers, export_peft, lora_factors
from .export import peft_lora_fields, read_peft_config
from .inject import get_state, inject, rollback, set_adapter
from .io import CONFIG_NAME, atomic_paths, atomic_write_text, file_errors, load_adapter, load_tensors_into, module_tree, read_adapter_config
from .io import read_tensors, save_adapter, save_tensors

logger = logging.getLogger(__name__)

#: diffusers pipeline component -> kohya key prefix
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
#: model class recorded in ``adapter_config.json`` -> SDXL pipeline component
COMPONENT_OF_CLASS = {
    "UNet2DConditionModel": "unet",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
CLASS_OF_COMPONENT = {c: cls for cls, c in COMPONENT_OF_CLASS.items()}
SDXL_LAYERS_PER_BLOCK = 2
#: formats an adapter converts to
FORMATS = ("mm_subspace", "peft", "diffusers", "kohya")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def report_ignored(source: str, ignored: list[str], what: str = "ignored keys") -> None:
    """Log (non-strict loading) exactly which entries were skipped."""
    if ignored:
        logger.warning("loading %s non-strictly: %s (%d): %s", source, what, len(ignored), ignored)


def _listing(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''} ({len(keys)} in all)"


# -- kohya names ------------------------------------------------------------------------------------
def sgm_unet_name(name: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """diffusers UNet module name -> the name in kohya's SDXL ("sgm") UNet.

    Inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers``: down block ``b``'s layer ``j`` is
    ``input_blocks.{1 + b·(L+1) + j}``, up block ``b``'s layer ``j`` is ``output_blocks.{b·(L+1) + j}``
    (``L`` = layers per block; sub-module ``.0`` = resnet, ``.1`` = attention), the mid block is the
    flat sequence ``middle_block.{0, 1, 2}`` = resnet, attention, resnet.

    Raises:
        ConfigError: a module outside the attention blocks, time embeddings and resnet time
            projections (kohya's SDXL LoRA does not name it), or an index that does not fit ``L``.
    """
    step = layers_per_block + 1
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", name)
    if m:
        kind, block, sub, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        limit = layers_per_block if kind == "down_blocks" else step
        if layer >= limit:
            raise ConfigError(
                f"{name!r}: layer index {layer} does not fit layers_per_block={layers_per_block}; pass the UNet's "
                "config value (unet.config.layers_per_block) as layers_per_block"
            )
        index = 1 + block * step + layer if kind == "down_blocks" else block * step + layer
        prefix = "input_blocks" if kind == "down_blocks" else "output_blocks"
        return _sgm_inner(f"{prefix}.{index}", sub, rest, name)
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", name)
    if m:
        # the mid block is one flat sequence (resnet, attention, resnet): no inner index
        index = {("attentions", 0): 1, ("resnets", 0): 0, ("resnets", 1): 2}.get((m[1], int(m[2])))
        if index is not None and (m[1] == "attentions" or m[3] == "time_emb_proj"):
            return f"middle_block.{index}.{m[3] if m[1] == 'attentions' else 'emb_layers.1'}"
    raise ConfigError(
        f"UNet module {name!r} has no name in kohya's SDXL LoRA layout (attention blocks, resnet time "
        "projections and time/added embeddings only); export it with export_diffusers instead"
    )


def _sgm_inner(prefix: str, sub: str, rest: str, name: str) -> str:
    if sub == "attentions":
        return f"{prefix}.1.{rest}"
    if rest == "time_emb_proj":
        return f"{prefix}.0.emb_layers.1"
    raise ConfigError(
        f"UNet module {name!r}: only the time_emb_proj of a resnet has a kohya SDXL name; "
        "export it with export_diffusers instead"
    )


def kohya_module_key(component: str, name: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """``"lora_unet_input_blocks_4_1_..._to_q"`` for a module of an SDXL pipeline component."""
    if component not in KOHYA_PREFIX:
        raise ConfigError(f"unknown SDXL component {component!r}; one of {sorted(KOHYA_PREFIX)}")
    if component == "unet":
        name = sgm_unet_name(name, layers_per_block)
    elif not name.startswith(("text_model.", "text_projection")):
        name = "text_model." + name  # transformers 5's CLIPTextModel dropped the prefix kohya keeps
    return f"{KOHYA_PREFIX[component]}_{name.replace('.', '_')}"


def _layers_per_block(model: nn.Module | None, default: int | None) -> int:
    value = getattr(getattr(model, "config", None), "layers_per_block", None)
    if value is not None:
        return int(value)
    return SDXL_LAYERS_PER_BLOCK if default is None else int(default)


def kohya_state_dict(
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    layers_per_block: int | None = None,
) -> dict[str, torch.Tensor]:
    """kohya-keyed tensors (``lora_down`` (r, in), ``lora_up`` = B·M (out, r), ``alpha``) for the given components.

    Args:
        layers_per_block: the UNet's ``layers_per_block``; read from ``unet.config`` when present,
            else SDXL's 2.
    """
    parts = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if all(m is None for m in parts.values()):
        raise ConfigError("kohya export needs at least one of unet=, text_encoder=, text_encoder_2=")
    lpb = _layers_per_block(unet, layers_per_block)
    state: dict[str, torch.Tensor] = {}
    for component, model in parts.items():
        if model is None:
            continue
        refuse_dora(model, adapter_name, "kohya")
        factors = lora_factors(model, adapter_name)
        leaves = {name.rsplit(".", 1)[-1] for name in factors}
        if component != "unet" and leaves & {"q_proj", "k_proj", "v_proj"} and "out_proj" not in leaves:
            logger.warning(
                "%s: q/k/v_proj adapted without out_proj. A1111/ComfyUI load this file, but diffusers' kohya "
                "converter (0.42) recognises text-encoder attention keys only when out_proj is present and "
                "then drops or rejects them; add out_proj to the targets or export with export_diffusers", component)
        for name, (down, up, scaling) in factors.items():
            key = kohya_module_key(component, name, lpb)
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(scaling * down.shape[0], dtype=torch.float32)
    return state


def export_kohya(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    layers_per_block: int | None = None,
) -> Path:
    """Write one kohya/A1111 SDXL LoRA ``.safetensors`` file (see the module docstring); returns its path.

    Stock ``StableDiffusionXLPipeline.load_lora_weights(path)``, A1111 and ComfyUI load it; the mixer
    of MoSLoRA / TS-Mixing is folded into ``lora_up`` and alpha is the true one.
    """
    state = kohya_state_dict(unet, text_encoder, text_encoder_2, adapter_name, layers_per_block)
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ConfigError(f"kohya LoRAs are single .safetensors files; got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    downs = [v for k, v in state.items() if k.endswith(".lora_down.weight")]
    alphas = [float(v) for k, v in state.items() if k.endswith(".alpha")]
    methods = sorted({get_state(m).configs[adapter_name].method for m in (unet, text_encoder, text_encoder_2) if m is not None})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(int(d.shape[0]) for d in downs)),
        "ss_network_alpha": str(max(alphas)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "mm_subspace_methods": ",".join(methods),
    }
    with atomic_paths(out) as (tmp,):
        save_tensors(state, tmp, metadata=metadata)
    return out


def _kohya_name_map(component: str, model: nn.Module, layers_per_block: int) -> dict[str, str]:
    """kohya module key -> module name, for every wrappable module of ``model`` (sgm and diffusers spellings)."""
    from .bases import find_base
    from .inject import _base_of, _candidate_modules

    found = {}
    for name, module in _candidate_modules(model).items():
        if find_base(_base_of(module)) is None:
            continue
        found[f"{KOHYA_PREFIX[component]}_{name.replace('.', '_')}"] = name
        try:
            found[kohya_module_key(component, name, layers_per_block)] = name
        except ConfigError:
            pass  # no sgm spelling for this module; its diffusers spelling above still resolves
    return found


@file_errors
def import_kohya(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    strict: bool = True,
    layers_per_block: int | None = None,
) -> dict[str, list[str]]:
    """Load a kohya/A1111 SDXL LoRA file onto the given components as our ``lora`` (per-module rank and alpha).

    Returns component -> adapted module names. Keys that are not plain LoRA (``dora_scale``,
    LoCon's ``lora_mid``, LoHa's ``hada_*``), keys of components not passed, and modules the models
    do not have are errors listed in full; ``strict=False`` skips and logs them.
    """
    from .methods.lora import LoraConfig

    source = Path(path)
    tensors = read_tensors(source)
    parts = {c: m for c, m in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if m is not None}
    if not parts:
        raise ConfigError("import_kohya needs at least one of unet=, text_encoder=, text_encoder_2=")
    lpb = _layers_per_block(unet, layers_per_block)
    names = {c: _kohya_name_map(c, m, lpb) for c, m in parts.items()}
    plan: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: {} for c in parts}
    unknown, wrong = [], []
    for key, value in tensors.items():
        module_key, _, rest = key.partition(".")
        suffix = "." + rest
        component = next((c for c, p in KOHYA_PREFIX.items() if module_key.startswith(p + "_")), None)
        module = names.get(component, {}).get(module_key)
        if suffix not in KOHYA_SUFFIXES or module is None:
            unknown.append(key)
            continue
        plan[component].setdefault(module, {})[suffix] = value
    for component, modules in plan.items():
        for module, entry in modules.items():
            lacking = [s for s in KOHYA_SUFFIXES[:2] if s not in entry]
            if lacking:
                wrong.append(f"{component}:{module} lacks {lacking}")
            elif entry[".lora_down.weight"].dim() != 2 or entry[".lora_up.weight"].shape[1] != entry[".lora_down.weight"].shape[0]:
                wrong.append(f"{component}:{module} has down {tuple(entry['.lora_down.weight'].shape)}, up {tuple(entry['.lora_up.weight'].shape)}")
    if wrong:
        raise AdapterFileError(f"{source}: {len(wrong)} module(s) are not a valid LoRA pair: {wrong[:5]}")
    if unknown and strict:
        raise AdapterFileError(
            f"{source} holds keys that are not plain LoRA of the passed components: {_listing(unknown)}. "
            "(dora_scale / lora_mid / hada_* are other methods; lora_te2_* needs text_encoder_2=.) "
            "Pass strict=False to load the rest and skip these."
        )
    report_ignored(str(source), unknown)
    done: dict[str, list[str]] = {}
    with rollback(*parts.values()):
        for component, modules in plan.items():
            if not modules:
                continue
            model = parts[component]
            ranks = {re.escape(m): int(e[".lora_down.weight"].shape[0]) for m, e in modules.items()}
            alphas = {re.escape(m): float(e[".alpha"]) if ".alpha" in e else float(ranks[re.escape(m)]) for m, e in modules.items()}
            config = LoraConfig(rank=max(ranks.values()), targets=sorted(modules), rank_pattern=ranks, alpha_pattern=alphas)
            ours = {f"{m}.lora_A": e[".lora_down.weight"] for m, e in modules.items()}
            ours.update({f"{m}.lora_B": e[".lora_up.weight"] for m, e in modules.items()})
            _inject_and_load(model, config, ours, adapter_name, True, f"{source} ({component})")
            done[component] = sorted(modules)
    if not done:
        raise AdapterFileError(f"{source}: no LoRA module of the passed components was found (keys: {_listing(sorted(tensors))})")
    return done


def _inject_and_load(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], adapter_name: str,
                     strict: bool, source: str | os.PathLike) -> str:
    """Inject ``config``, load ``tensors`` (strictly unless told), activate; on failure leave ``model`` as it was."""
    with rollback(model):
        inject(model, config, adapter_name)
        load_tensors_into(model, adapter_name, tensors, strict=strict, source=str(source))
        set_adapter(model, adapter_name)
    return adapter_name


#: PEFT-side tensor name -> ours
_OUR_NAME = {
    "lora_A": "lora_A", "lora_B": "lora_B", "lora_AB": "mixer", "lora_magnitude_vector": "magnitude",
    "lora.down": "lora_A", "lora.downB": "mixer", "lora.up": "lora_B",  # diffusers' spellings (official SDXL files)
    "lora_linear_layer.down": "lora_A", "lora_linear_layer.downB": "mixer", "lora_linear_layer.up": "lora_B",
}


def _peft_tensors(raw: dict[str, torch.Tensor], folder: Path, pattern: re.Pattern, what: str, strict: bool) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors (``base_model.model.<m>.<name>[.<adapter>].weight``) -> ``"<m>.<our name>"``.

    Keys ``pattern`` does not match are an error listing them, or with ``strict=False`` skipped and logged.
    """
    ours, unknown = {}, []
    for key, value in raw.items():
        m = pattern.search(key)
        if m is None:
            unknown.append(key)
            continue
        ours[f"{key[: m.start()].removeprefix('base_model.model.')}.{_OUR_NAME[m[1]]}"] = value
    if unknown and strict:
        raise AdapterFileError(
            f"{folder} holds tensors that are not {what} tensors: {_listing(sorted(unknown))}. "
            "Pass strict=False to load the rest and skip these."
        )
    report_ignored(str(folder), sorted(unknown))
    return ours


# -- DoRA ---------------------------------------------------------------------------------------------
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
    """Load a PEFT ``use_dora=True`` LoRA checkpoint onto ``model`` as our ``dora`` (magnitude per output row)."""
    from .methods.dora import DoRAConfig

    folder = Path(path)
    cfg = read_peft_config(folder)
    if cfg.get("peft_type") != "LORA" or not cfg.get("use_dora"):
        raise AdapterFileError(f"{folder} is not a PEFT DoRA checkpoint (peft_type LORA with use_dora=true); "
                               "use mm_subspace.import_peft for plain LoRA")
    ours = _peft_tensors(_read_peft_weights(folder), folder, _PEFT_DORA_KEY, "a DoRA adapter's", strict)
    modules = _modules_of(ours)
    return _inject_and_load(model, DoRAConfig(targets=modules, **peft_lora_fields(cfg, modules)), ours, adapter_name, strict, folder)


# -- official MoSLoRA checkpoints -------------------------------------------------------------------
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

    ``.bin`` weights are read with ``torch.load(weights_only=True)`` only (never unpickled).
    """
    folder = Path(path)
    if (folder / DIFFUSERS_WEIGHTS).is_file() and not (folder / "adapter_config.json").is_file():
        parts = _read_official_diffusers(folder, strict)
    else:
        cfg = read_peft_config(folder)
        if cfg.get("peft_type") != "LORA":
            raise AdapterFileError(f"{folder} is a {cfg.get('peft_type')!r} PEFT adapter, not an (official) MoSLoRA checkpoint")
        for flag in ("use_dora", "lora_bias"):
            if cfg.get(flag):
                raise AdapterFileError(f"{folder}: option {flag}=True is not part of MoSLoRA; import refused")
        parts = {None: (cfg, _peft_tensors(_read_peft_weights(folder), folder, _OFFICIAL_KEY, "MoSLoRA's lora_A / lora_AB / lora_B", strict))}
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
        raise AdapterFileError(f"{folder / DIFFUSERS_WEIGHTS} holds keys of no SDXL component: {_listing(sorted(unknown))}. "
                               "Pass strict=False to load the rest and skip these.")
    report_ignored(str(folder), sorted(unknown))
    parts = {}
    for component, raw in groups.items():
        tensors = _peft_tensors(raw, folder, _OFFICIAL_KEY, "MoSLoRA's lora down / downB / up", strict)
        if component == "text_encoder":
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        ranks = {re.escape(m): int(tensors[f"{m}.lora_A"].shape[0]) for m in _modules_of(tensors) if f"{m}.lora_A" in tensors}
        if not ranks:
            raise AdapterFileError(f"{folder}: no lora down (lora_A) tensor for {component}")
        cfg = {"peft_type": "LORA", "r": max(ranks.values()), "lora_alpha": max(ranks.values()),
               "rank_pattern": ranks, "alpha_pattern": {k: float(v) for k, v in ranks.items()}}
        parts[component] = (cfg, tensors)
    return parts


def _modules_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in tensors})


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
    from .methods.moslora import MoSLoRAConfig

    parts = read_official_moslora(path, strict=strict)
    if component not in parts:
        if component is not None or len(parts) > 1:
            raise ConfigError(f"{path} holds MoSLoRA adapters for {sorted(map(str, parts))}; pass component= one of them")
        component = next(iter(parts))
    cfg, tensors = parts[component]
    modules = _modules_of(tensors)
    config = MoSLoRAConfig(targets=modules, **peft_lora_fields(cfg, modules))
    return _inject_and_load(model, config, tensors, adapter_name, strict, path)


# -- stand-in models: conversions without the base model --------------------------------------------
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
    """Load a saved adapter folder onto a stand-in of its recorded module shapes: (model, adapter_config.json)."""
    meta = read_adapter_config(path)
    dtype = meta.get("dtype")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) else torch.float32
    model = standin_model(meta["modules"], dtype)
    load_adapter(model, path, strict=strict)
    return model, meta


@file_errors
def standin_from_official(path: str | os.PathLike, strict: bool = True) -> dict[str | None, tuple[nn.Module, dict[str, Any]]]:
    """An official MoSLoRA checkpoint imported onto stand-in models: component (``None`` for the PEFT
    layout) -> (model, ``base_model`` record for a saved adapter: class, name_or_path, no fingerprint)."""
    models = {}
    for component, (cfg, tensors) in read_official_moslora(path, strict=strict).items():
        shapes = {}
        for module in _modules_of(tensors):
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


# -- adapter folders of a whole SDXL pipeline -------------------------------------------------------
@file_errors
def adapter_components(path: str | os.PathLike, component: str | None = None) -> dict[str | None, Path]:
    """Adapter folders of ``path``: ``{component: folder}``.

    A pipeline adapter folder holds ``unet/``, ``text_encoder/``, ``text_encoder_2/`` sub-folders
    (each saved with :func:`mm_subspace.save_adapter`, as diffusers lays out a pipeline); a single
    adapter folder maps to ``component`` or, when not given, to the SDXL component its recorded base
    class names (``None`` for other models).
    """
    folder = Path(path)
    if (folder / CONFIG_NAME).is_file():
        if component is None:
            meta = read_adapter_config(folder)
            component = COMPONENT_OF_CLASS.get((meta.get("base_model") or {}).get("class"))
        elif component not in KOHYA_PREFIX:
            raise ConfigError(f"unknown SDXL component {component!r}; one of {sorted(KOHYA_PREFIX)}")
        return {component: folder}
    found = {c: folder / c for c in KOHYA_PREFIX if (folder / c / CONFIG_NAME).is_file()}
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


@file_errors
def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What ``mm-subspace inspect`` prints: method, ranks, alphas, targets, trainable parameters, base fingerprint."""
    folder = Path(path)
    meta = read_adapter_config(folder)
    config: AdapterConfig = meta["config_obj"]
    model, _ = load_standin(folder)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = sorted(meta["modules"])
    ranks = sorted({config.rank_for(m) for m in modules})
    alphas = sorted({config.alpha_for(m) for m in modules})
    base = meta.get("base_model") or {}
    return {
        "path": str(folder),
        "method": config.method,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "modules": len(modules),
        "targets": sorted({m.split(".")[-1] if not m.split(".")[-1].isdigit() else ".".join(m.split(".")[-2:]) for m in modules}),
        "trainable_params": trainable,
        "base_class": base.get("class"),
        "base_name_or_path": base.get("name_or_path"),
        "base_fingerprint": base.get("fingerprint"),
        "dtype": meta.get("dtype"),
    }


__all__ = [
    "FORMATS",
    "KOHYA_PREFIX",
    "adapter_components",
    "convert_adapter",
    "convert_models",
    "convert_official_moslora",
    "describe_adapter",
    "dora_magnitudes",
    "export_dora_peft",
    "export_kohya",
    "import_dora_peft",
    "import_kohya",
    "import_moslora",
    "kohya_module_key",
    "kohya_state_dict",
    "load_standin",
    "read_official_moslora",
    "sgm_unet_name",
    "standin_from_official",
    "standin_model",
]
