"""4-bit base layers (QLoRA, QMoSLoRA): adapters around ``bitsandbytes.nn.Linear4bit``.

The base weight stays NF4/FP4 (optionally double-quantised, Dettmers et al. 2023); adapters are
ordinary float32 parameters and every method's forward is unchanged, so QMoSLoRA is just MoSLoRA
injected into a 4-bit model (the MoSLoRA paper's InternLM2 recipe: NF4, double quantisation,
r=512, α=256; §4.2, Table 5 and Appendix B.2).

* :class:`Linear4bitKind` reads a ``Linear4bit``: ``weight()`` dequantises
  (``bitsandbytes.functional.dequantize_4bit``), so methods that read W through
  ``Adapter.base_weight()`` (DoRA-style norms, SVD-based methods) see the dequantised matrix.
* Merge dequantises, merges and requantises (as PEFT does). It is lossy: the merged layer carries
  a second quantisation error and unmerge restores W only up to that error (a warning says so).
  For an exact deployable model, export the adapter and merge it into the full-precision base.
* The kind is registered by :mod:`mm_subspace.inject` (so on ``import mm_subspace``), without importing bitsandbytes:
  a module can only be a ``Linear4bit`` if bitsandbytes is already loaded.
* bitsandbytes is never imported by ``import mm_subspace``; other libraries import it anyway (diffusers
  pulls in peft, which imports it). On CPUs with AVX512-BF16 its import tries to fetch an optional fused
  CPU kernel from the ``kernels`` hub and logs ``Failed to load CPU gemm_4bit_forward from
  kernels-community ...`` when it cannot (offline, or an untrusted repository), 4-bit or not. That kernel
  is only an accelerated path of the repacked AVX512-BF16 layout, which every helper here switches off
  (below), and bitsandbytes falls back to its own library, so :func:`silence_kernel_hub_warning` (run on
  ``import mm_subspace``) drops exactly that one message and nothing else.
* CPU pitfall (``/work/shared/ENVIRONMENT.md``): on CPUs with AVX512-BF16 the first eval no-grad
  forward repacks the weights, after which small layers crash and training silently loses
  gradients. Every helper here, and injection itself, sets ``support_avx512bf16_for_cpu = False``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from torch import nn

from .bases import BaseKind
from .compat import enable_activation_checkpointing
from .config import check_choice

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")

KERNEL_HUB_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_HUB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _KernelHubFilter(logging.Filter):
    """Drops bitsandbytes' "could not fetch the optional CPU kernel from the hub" warning, keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KERNEL_HUB_MESSAGE)


def silence_kernel_hub_warning() -> None:
    """Filter bitsandbytes' kernel-hub warning out of its CPU-backend logger (idempotent; imports nothing)."""
    hub_logger = logging.getLogger(KERNEL_HUB_LOGGER)
    if not any(isinstance(f, _KernelHubFilter) for f in hub_logger.filters):
        hub_logger.addFilter(_KernelHubFilter())


silence_kernel_hub_warning()


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("4-bit adapters need bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (never imports bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and hasattr(bnb, "nn") and isinstance(module, bnb.nn.Linear4bit)


def disable_cpu_repacking(model: nn.Module) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every ``Linear4bit`` (and undo a repack); returns the count."""
    count = 0
    for module in model.modules():
        if is_linear4bit(module):
            module.support_avx512bf16_for_cpu = False
            _unpack_cpu(module)
            count += 1
    return count


def _unpack_cpu(module: nn.Module) -> None:
    """Undo bitsandbytes' AVX512-BF16 CPU repacking, if a forward already did it."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        module.quant_state = weight.quant_state


def dequantize(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight of a ``Linear4bit``, in the dtype it was quantised from."""
    bnb = _bnb()
    _unpack_cpu(module)
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).detach()


def requantize(module: nn.Module, dense: torch.Tensor) -> None:
    """Replace a ``Linear4bit``'s weight by ``dense`` (out, in), quantised with the same settings."""
    bnb = _bnb()
    old = module.weight
    dtype = old.quant_state.dtype if old.quant_state is not None else torch.float32
    new = bnb.nn.Params4bit(
        dense.detach().to(device="cpu", dtype=dtype).contiguous(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=module,
    )
    module.weight = new._quantize(old.device)


class Linear4bitKind(BaseKind):
    """``bitsandbytes.nn.Linear4bit``: dequantised reads, requantised writes, float32 adapters by default."""

    name = "linear4bit"
    _warned = False

    def matches(self, module: nn.Module) -> bool:
        return is_linear4bit(module)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return dequantize(module)

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        if not Linear4bitKind._warned:
            logger.warning(
                "merging into a 4-bit layer requantises its weight: outputs match the adapted model only up to "
                "the 4-bit rounding error, and unmerge does not restore the original bits exactly. For an exact "
                "merge, load the adapter onto the full-precision base and merge there."
            )
            Linear4bitKind._warned = True
        requantize(module, weight)

    def float_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float32

    def wrap(self, module: nn.Module, state: Any, module_name: str) -> Any:
        module.support_avx512bf16_for_cpu = False
        _unpack_cpu(module)
        return super().wrap(module, state, module_name)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("RMSNorm", "LayerNorm", "Norm"))


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Make a 4-bit model ready for adapter training (QLoRA §3; PEFT's ``prepare_model_for_kbit_training``).

    Freezes every base parameter, casts normalisation layers to float32 (PEFT casts every
    non-quantised half-precision parameter; only norms need it, and embeddings stay small), enables
    gradient checkpointing (non-reentrant) and input gradients, and disables the CPU repacking.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module):
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != torch.float32:
                    param.data = param.data.float()
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        enable_activation_checkpointing(model)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    disable_cpu_repacking(model)
    return model


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
               skip_modules: list[str] | None = None) -> Any:
    """The transformers ``BitsAndBytesConfig`` used by :func:`load_4bit`."""
    from transformers import BitsAndBytesConfig


    check_choice("quant_type", quant_type, QUANT_TYPES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def load_4bit(
    model_name_or_path: str | os.PathLike,
    model_class: Any = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: list[str] | None = None,
    device_map: Any = "cpu",
    prepare: bool = True,
    gradient_checkpointing: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers model with its linear layers in 4-bit, ready for :func:`mm_subspace.inject`.

    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    (the QLoRA setting), ``device_map="cpu"`` by default, then :func:`prepare_for_kbit_training`.

    Args:
        model_class: e.g. ``LlavaForConditionalGeneration``; default ``AutoModelForCausalLM``.
        compute_dtype: dtype of the 4-bit matmuls (``torch.bfloat16`` on GPUs, float32 on CPU).
        skip_modules: modules kept in full precision, matched by name prefix/suffix (bitsandbytes'
            ``llm_int8_skip_modules``: use ``"model.vision_tower"``, and include ``"lm_head"``, which a
            custom list otherwise drops).
        kwargs: passed to ``from_pretrained``.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    _bnb()
    model = model_class.from_pretrained(
        model_name_or_path,
        quantization_config=bnb_config(quant_type, double_quant, compute_dtype, skip_modules),
        device_map=device_map,
        **kwargs,
    )
    disable_cpu_repacking(model)
    if prepare:
        prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    return model


def quantize_model_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip: tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers (except names ending in ``skip``) by ``Linear4bit``, in place.

    For models built in memory (tests, tiny configs); weights are quantised from their current values.
    """
    bnb = _bnb()

    check_choice("quant_type", quant_type, QUANT_TYPES)
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not is_linear4bit(module)
        and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name, linear in targets:
        weight = linear.weight.detach()
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
            quant_type=quant_type, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.to("cpu").contiguous(), requires_grad=False, blocksize=blocksize,
            compress_statistics=double_quant, quant_type=quant_type, module=new,
        )._quantize(weight.device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        new.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the 4-bit linear weights (packed data + quantisation statistics) and of the same in float16.

    ``model.get_memory_footprint()`` counts parameters and buffers only, not the absmax statistics a
    ``QuantState`` holds; this counts both, so ``quantized / float16`` is the true weight ratio
    (NF4 + double quantisation: ≈ 4.13 bits per weight, QLoRA §3).
    """
    quantized = float16 = 0
    for module in model.modules():
        if not is_linear4bit(module):
            continue
        weight = module.weight
        quantized += weight.data.numel() * weight.data.element_size()
        state = weight.quant_state
        for tensor in _state_tensors(state):
            quantized += tensor.numel() * tensor.element_size()
        float16 += module.in_features * module.out_features * 2
    return {"quantized": quantized, "float16": float16}


def _state_tensors(state: Any) -> list[torch.Tensor]:
    if state is None:
        return []
    tensors = [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
    return tensors + _state_tensors(getattr(state, "state2", None))


__all__ = [
    "Linear4bitKind",
    "bnb_config",
    "dequantize",
    "disable_cpu_repacking",
    "is_linear4bit",
    "load_4bit",
    "prepare_for_kbit_training",
    "quantize_model_4bit",
    "requantize",
    "weight_memory",
]
