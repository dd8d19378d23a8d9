"""kohya / A1111 / ComfyUI SDXL LoRA files: one safetensors file, one entry per module::

      lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, in)
      lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight     (out, r)
      lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha              ()  = alpha
      lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight        ...
      lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight        ...

UNet names are those of kohya's SDXL training UNet (Stability's "sgm" layout: ``input_blocks``,
``middle_block``, ``output_blocks``) with ``.`` replaced by ``_``; the update is
``ΔW = (alpha / r) · up · down``. MoSLoRA's and TS-Mixing's mixer is folded exactly into
``lora_up = B · M`` (MoSLoRA Eq. 7: ``B M A`` is a rank-r product), and the true alpha is written,
so any kohya-compatible loader reproduces our outputs. Loading is strict by default (unknown keys such
as ``dora_scale``, missing keys and shape mismatches raise :class:`~mm_subspace.errors.AdapterFileError`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_paths, file_errors
from ..errors import AdapterFileError, ConfigError
from ..hub import resolve_file
from ..inject import get_state, rollback
from ..io import read_tensors, save_tensors
from .common import inject_and_load, key_listing, report_ignored
from .dora_peft import refuse_dora
from .peft import lora_factors

logger = logging.getLogger(__name__)


#: diffusers pipeline component -> kohya key prefix
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


SDXL_LAYERS_PER_BLOCK = 2


KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


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
    from ..bases import find_base
    from ..targets import base_of, candidate_modules

    found = {}
    for name, module in candidate_modules(model).items():
        if find_base(base_of(module)) is None:
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
    do not have are errors listed in full; ``strict=False`` skips and logs them. ``path`` is a file, or a Hub
    id: ``owner/name/<file>.safetensors``, or ``owner/name`` holding one ``.safetensors`` file.
    """
    from ..methods.lora import LoraConfig

    source = resolve_file(path, ".safetensors", "kohya LoRA file")
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
                down, up = tuple(entry[".lora_down.weight"].shape), tuple(entry[".lora_up.weight"].shape)
                wrong.append(f"{component}:{module} has down {down}, up {up}")
    if wrong:
        raise AdapterFileError(f"{source}: {len(wrong)} module(s) are not a valid LoRA pair: {wrong[:5]}")
    if unknown and strict:
        raise AdapterFileError(
            f"{source} holds keys that are not plain LoRA of the passed components: {key_listing(unknown)}. "
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
            inject_and_load(model, config, ours, adapter_name, True, f"{source} ({component})")
            done[component] = sorted(modules)
    if not done:
        raise AdapterFileError(f"{source}: no LoRA module of the passed components was found (keys: {key_listing(sorted(tensors))})")
    return done
