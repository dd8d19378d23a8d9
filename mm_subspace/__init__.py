"""mm_subspace: subspace tuning (LoRA, MoSLoRA, SuLoRA and the survey's family) for multimodal models.

Quick start::

    import mm_subspace as mms
    mms.inject(model, mms.MoSLoRAConfig(rank=8, alpha=16, targets="llama"))
    ...train...
    mms.save_adapter(model, "out/")            # our format, bit-exact round trip
    mms.export_peft(model, "out/peft")         # plain LoRA with the mixer folded in
"""

from __future__ import annotations

from ._version import __version__

from .config import AdapterConfig, LowRankConfig
from .errors import (
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    IncompatibleAdapterError,
    MergeError,
    NonFiniteError,
    ShippedModelError,
    SubspaceError,
    TargetError,
)
from .inject import (
    ParameterCounts,
    active_adapters,
    adapter_state_dict,
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
    parameter_counts,
    print_trainable_parameters,
    remove_adapter,
    routing,
    set_adapter,
    set_scale,
    trainable_parameters,
    unload,
    unmerge,
)
from .formats import (
    convert_adapter,
    convert_official_moslora,
    describe_adapter,
    export_diffusers,
    export_dora_peft,
    export_kohya,
    export_peft,
    import_dora_peft,
    import_kohya,
    import_moslora,
    import_peft,
    lora_factors,
    lora_state_dict,
)
from .io import base_fingerprint, load_adapter, read_adapter_config, save_adapter
from .layer import Adapter, AdapterLayer, LowRankAdapter
from .methods.asylora import AsyLoRAConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck_adapter import BottleneckAdapterConfig
from .methods.dora import DoRAConfig
from .methods.flora import FLoRAConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.moslora import MoSLoRAConfig
from .methods.parallel_adapter import ParallelAdapterConfig
from .methods.sam_parser import SAMParserConfig
from .methods.spectral import SpectralConfig
from .methods.ssb import SSBConfig
from .methods.ssl import SSLConfig
from .methods.sulora import SuLoRAConfig
from .methods.svdiff import SVDiffConfig
from .methods.trilora import TriLoRAConfig
from .methods.ts_mixing import TSMixingConfig
from .presets import list_presets, llava_config, register_preset
from .quant import load_4bit, prepare_for_kbit_training, quantize_model_4bit
from .recipes import get_recipe, list_recipes
from .registry import get_method, list_methods, register_method


def config_for(method: str, **kwargs) -> AdapterConfig:
    """Build the config of method ``method`` from keyword arguments: ``config_for("moslora", rank=8)``."""
    return get_method(method).config_class(**kwargs)



__all__ = [
    "__version__",
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterLayer",
    "AdapterStateError",
    "AsyLoRAConfig",
    "BitFitConfig",
    "BottleneckAdapterConfig",
    "ConfigError",
    "DoRAConfig",
    "FLoRAConfig",
    "IA3Config",
    "IncompatibleAdapterError",
    "LoraConfig",
    "LowRankAdapter",
    "LowRankConfig",
    "MergeError",
    "MoSLoRAConfig",
    "NonFiniteError",
    "ParallelAdapterConfig",
    "ParameterCounts",
    "SAMParserConfig",
    "SSBConfig",
    "SSLConfig",
    "SVDiffConfig",
    "ShippedModelError",
    "SpectralConfig",
    "SuLoRAConfig",
    "SubspaceError",
    "TSMixingConfig",
    "TargetError",
    "TriLoRAConfig",
    "active_adapters",
    "adapter_layers",
    "adapter_state_dict",
    "aux_loss",
    "base_fingerprint",
    "config_for",
    "convert_adapter",
    "convert_official_moslora",
    "describe_adapter",
    "disable_adapters",
    "enable_adapters",
    "export_diffusers",
    "export_dora_peft",
    "export_kohya",
    "export_peft",
    "forward_context",
    "get_method",
    "get_recipe",
    "import_dora_peft",
    "import_kohya",
    "import_moslora",
    "import_peft",
    "inject",
    "iter_adapters",
    "list_adapters",
    "list_methods",
    "list_presets",
    "list_recipes",
    "llava_config",
    "load_4bit",
    "load_adapter",
    "lora_factors",
    "lora_state_dict",
    "merge",
    "merge_and_unload",
    "parameter_counts",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "quantize_model_4bit",
    "read_adapter_config",
    "register_method",
    "register_preset",
    "remove_adapter",
    "routing",
    "save_adapter",
    "set_adapter",
    "set_scale",
    "trainable_parameters",
    "unload",
    "unmerge",
]
