"""diffusers SDXL LoRA: ``pytorch_lora_weights.safetensors`` with ``unet.``/``text_encoder.``/``text_encoder_2.`` keys.

Plain LoRA with mixer and scale folded into B (diffusers assumes alpha = r without metadata); DoRA
adds ``lora_magnitude_vector`` keys, which diffusers' SDXL loader reads. The official MoSLoRA code
loses the mixer on the way to diffusers; here the folded factors carry it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .dora_peft import dora_factors, dora_magnitudes
from .peft import lora_state_dict

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def diffusers_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One component's tensors for ``pytorch_lora_weights.safetensors`` (keys without the component prefix).

    Plain LoRA (mixer and scale folded into B), or for DoRA the same plus
    ``<module>.lora_magnitude_vector.weight`` (out,): diffusers' loader sees the magnitude keys and builds PEFT DoRA layers (scale
    folded into B
    is exact there too, since DoRA's ΔW = s·B·A both inside the norm and on the low-rank path).
    """
    if not dora_magnitudes(model, adapter_name):
        return lora_state_dict(model, adapter_name, fold_scale=True)
    factors, magnitudes = dora_factors(model, adapter_name)
    state = {}
    for name, (down, up, scaling) in factors.items():
        state[f"{name}.lora_A.weight"] = down.contiguous()
        state[f"{name}.lora_B.weight"] = (up * scaling).contiguous()
        # ".weight": diffusers 0.42's text-encoder path maps only this spelling (the UNet path takes both)
        state[f"{name}.lora_magnitude_vector.weight"] = magnitudes[name].contiguous()
    return state


def export_diffusers(
    save_directory: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that stock ``StableDiffusionXLPipeline.load_lora_weights`` loads.

    Pass the injected UNet and, when adapted, the text encoders. Scale and mixer are folded into
    ``lora_B`` (diffusers takes alpha = r when the file carries no metadata). DoRA adapters add
    ``lora_magnitude_vector`` keys (PEFT's layout), which the stock loader turns into DoRA layers.
    """
    from diffusers import StableDiffusionXLPipeline

    parts = {"unet_lora_layers": unet, "text_encoder_lora_layers": text_encoder, "text_encoder_2_lora_layers": text_encoder_2}
    layers = {key: diffusers_state_dict(m, adapter_name) for key, m in parts.items() if m is not None}
    if not layers:
        raise ConfigError("export_diffusers needs at least one of unet=, text_encoder=, text_encoder_2=")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(out, **layers, weight_name=DIFFUSERS_WEIGHTS)
    return out
