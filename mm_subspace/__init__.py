"""mm_subspace: subspace tuning (LoRA, MoSLoRA, SuLoRA and the survey's family) for multimodal models.

Quick start::

    import mm_subspace as mms
    mms.inject(model, mms.MoSLoRAConfig(rank=8, alpha=16, targets="llama"))
    ...train...
    mms.save_adapter(model, "out/")            # our format, bit-exact round trip
    mms.export_peft(model, "out/peft")         # plain LoRA with the mixer folded in
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import AdapterConfig
from .errors import (
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    IncompatibleAdapterError,
    MergeError,
    NonFiniteError,
    SubspaceError,
    TargetError,
)
from .export import export_diffusers, export_peft, import_peft, lora_factors, lora_state_dict
from .inject import (
    active_adapters,
    adapter_layers,
    aux_loss,
    disable_adapters,
    enable_adapters,
    forward_context,
    inject,
    iter_adapters,
    list_adapters,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    remove_adapter,
    set_adapter,
    set_scale,
    trainable_parameters,
    unload,
    unmerge,
)
from .io import adapter_state_dict, base_fingerprint, load_adapter, read_adapter_config, save_adapter
from .layer import Adapter, AdapterLayer, LowRankAdapter
from .methods.lora import LoraConfig
from .methods.moslora import MoSLoRAConfig
from .methods.ts_mixing import TSMixingConfig
from .presets import list_presets, register_preset
from .registry import get_method, list_methods, register_method


def config_for(method: str, **kwargs) -> AdapterConfig:
    """Build the config of method ``method`` from keyword arguments: ``config_for("moslora", rank=8)``."""
    return get_method(method).config_class(**kwargs)


__all__ = [name for name in dir() if not name.startswith("_")]
