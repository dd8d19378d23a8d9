"""The one wrapper layer and the adapter base classes.

Shape conventions (``nn.Linear`` style, used throughout the package):

* base weight ``W``: (out, in); ``y = x Wᵀ + b``
* ``lora_A``: (r, in), ``mixer`` M: (r, r), ``lora_B``: (out, r)
* ``ΔW = s · B · M · A`` with ``s = alpha / r``; the adapter adds ``s · B(M(A x))`` to the output.

The MoSLoRA paper writes the same thing in row form, ``x · A · W · B`` with A (d1×r), W (r×r) and
B (r×d2): our ``lora_A`` is its Aᵀ, our ``lora_B`` its Bᵀ, our ``mixer`` its Wᵀ (Eq. 7).

An :class:`AdapterLayer` replaces a target module in its parent. It runs the base module once, then
lets each active adapter turn the base output into the adapted output. All layers of one model share
one :class:`ModelState` (active adapters, disabled flag, per-forward context), so switching adapters
is O(1) and per-row routing (batched side-by-side generation) is one context manager.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .bases import BaseKind
from .config import AdapterConfig
from .errors import AdapterStateError, MergeError, TargetError
from .losses import MPC_PENALTIES, activation, record_once, training_forward


class ModelState:
    """State shared by every :class:`AdapterLayer` of one model.

    Attributes:
        configs: adapter name -> its config, in injection order.
        active: names of the adapters applied in forward, in order.
        disabled: when True every layer returns the base output.
        context: per-forward extras set by :func:`mm_subspace.forward_context`: ``adapter_rows``
            (one adapter name or ``None`` per batch row, tiled over the batch) and any tensors
            adapters read (``attention_mask`` for SuLoRA's router).

    Not thread-safe: two threads calling ``set_adapter`` or ``forward_context`` on the same model
    race. Use one model per thread, or the per-row routing of one batched call instead.
    """

    def __init__(self) -> None:
        self.configs: dict[str, AdapterConfig] = {}
        self.active: list[str] = []
        self.disabled: bool = False
        self.context: dict[str, Any] = {}
        self._row_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._slot_cache: dict[tuple, torch.Tensor] = {}

    def row_groups(self, batch: int, device: torch.device) -> dict[str | None, torch.Tensor]:
        """For the routed forward: adapter name -> indices of the batch rows it owns."""
        rows = self.context["adapter_rows"]
        key = (tuple(rows), batch, str(device))
        groups = self._row_cache.get(key)
        if groups is None:
            k = len(rows)
            if batch % k:
                raise AdapterStateError(
                    f"batch of {batch} rows is not a multiple of the {k} routed adapter rows {rows}; "
                    "pass one adapter name per prompt/image (classifier-free guidance doubling is handled)"
                )
            owner = [rows[i % k] for i in range(batch)]
            groups = {}
            for name in dict.fromkeys(rows):
                idx = [i for i, o in enumerate(owner) if o == name]
                groups[name] = torch.tensor(idx, dtype=torch.long, device=device)
            self._row_cache = {key: groups}
        return groups

    def row_slots(self, batch: int, device: torch.device, names: tuple[str, ...]) -> torch.Tensor:
        """For the vectorised routed forward: per batch row (batch,), the position of its owner in ``names``.

        Rows owned by the base or by an adapter not in ``names`` get ``len(names)``: the all-zero slot.
        Cached per (rows, batch, device, names), so all layers holding the same adapters share one tensor.
        """
        rows = self.context["adapter_rows"]
        key = (tuple(rows), batch, str(device), names)
        slots = self._slot_cache.get(key)
        if slots is None:
            position = {name: i for i, name in enumerate(names)}
            owner = [position.get(rows[i % len(rows)], len(names)) for i in range(batch)]
            slots = torch.tensor(owner, dtype=torch.long, device=device)
            if any(k[:3] != key[:3] for k in self._slot_cache):  # new rows: drop the old ones' entries
                self._slot_cache = {}
            self._slot_cache[key] = slots
        return slots


class Adapter(nn.Module):
    """One adapter's parameters and math for one wrapped layer.

    Subclasses set ``config_class`` and implement :meth:`forward` (and, when ΔW is a fixed matrix,
    :meth:`delta_weight`). Register them with :func:`mm_subspace.registry.register_method`.

    Args:
        kind: reader for the base module (dimensions, dense weight).
        base: the wrapped base module (read at construction only; not stored).
        config: the method's config.
        module_name: full name of the wrapped module, for error messages.
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    method: ClassVar[str] = ""
    #: ΔW is a fixed matrix, so it can be folded into W (merge) — False for routed/nonlinear methods
    mergeable: ClassVar[bool] = True
    #: why merge is impossible, for the error message when ``mergeable`` is False
    merge_refusal: ClassVar[str] = ""
    #: names of parameters the method keeps frozen (e.g. SuLoRA's A); all others train when active
    frozen_parameters: ClassVar[tuple[str, ...]] = ()
    #: short formula for docs and the README table
    formula: ClassVar[str] = ""
    #: paper / table reference for docs
    paper: ClassVar[str] = ""

    def __init__(self, kind: BaseKind, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__()
        self.config = config
        self.module_name = module_name
        self.in_features = kind.in_features(base)
        self.out_features = kind.out_features(base)
        self.rank = config.rank_for(module_name)
        self.alpha = config.alpha_for(module_name)
        self.scaling = self.alpha / self.rank
        self.user_scale = 1.0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._aux: torch.Tensor | None = None
        self.factory = {
            "device": kind.device(base),
            "dtype": getattr(torch, config.dtype) if config.dtype else kind.float_dtype(base),
        }

    # -- access to the wrapped layer (set by AdapterLayer; a plain attribute, not a submodule) --------
    def attach(self, layer: AdapterLayer) -> None:
        object.__setattr__(self, "_layer", layer)

    def base_weight(self) -> torch.Tensor:
        """The wrapped layer's current dense weight (out, in), dequantised if need be; for methods that use W."""
        layer = self.__dict__.get("_layer")
        if layer is None:
            raise AdapterStateError(f"{self.method} adapter on {self.module_name!r} is not attached to a layer")
        return layer.kind.weight(layer.base_layer)

    def base_bias(self) -> torch.Tensor | None:
        layer = self.__dict__.get("_layer")
        return getattr(layer.base_layer, "bias", None) if layer is not None else None

    # -- checks done before any model is touched ----------------------------------------------------
    @classmethod
    def validate(cls, kind: BaseKind, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        """Raise a clear error if ``config`` cannot adapt ``base``. Runs before injection mutates anything."""
        if config.low_rank:
            r, fan_in, fan_out = config.rank_for(module_name), kind.in_features(base), kind.out_features(base)
            if r > min(fan_in, fan_out):
                raise TargetError(
                    f"rank {r} is larger than min(in, out) = min({fan_in}, {fan_out}) of module "
                    f"{module_name!r}: a rank above the layer's own rank adds parameters but no expressive "
                    f"power. Use rank <= {min(fan_in, fan_out)}, or set rank_pattern={{{module_name.split('.')[-1]!r}: "
                    f"{min(fan_in, fan_out)}}} for this module."
                )

    # -- math -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        """Adapted output from the layer input ``x`` (…, in) and the base output (…, out)."""
        raise TypeError(f"adapter class {type(self).__name__} must define forward(x, base_out, **context)")

    @property
    def total_scale(self) -> float:
        return self.scaling * self.user_scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in), scaled, such that the merged weight is W + ΔW. Only for ``mergeable`` methods."""
        raise MergeError(self._refusal("merge"))

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (r, in), up (out, r)) with ``ΔW = scaling · up · down`` — the plain-LoRA export."""
        raise MergeError(self._refusal("export to plain LoRA"))

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Merged dense weight from the base weight. Default: ``W + ΔW``."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Base weight back from the merged one. Default: ``W' − ΔW``."""
        return merged - self.delta_weight().to(merged.dtype)

    #: merge rewrites W; False for methods whose merge only touches the bias (BitFit), so a
    #: quantised W is never re-quantised for nothing
    merges_weight: ClassVar[bool] = True

    def merge_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Merged bias (out,) from the base bias (float32, ``None`` when the base has none).

        Default: unchanged (return ``bias`` itself). A tensor returned for a bias-less base is
        written as a new bias, which unmerge removes again.
        """
        return bias

    def unmerge_bias(self, merged: torch.Tensor | None) -> torch.Tensor | None:
        """Base bias back from the merged one. Default: unchanged (return ``merged`` itself)."""
        return merged

    def _refusal(self, what: str) -> str:
        reason = self.merge_refusal or f"{self.method} does not define a fixed ΔW"
        return f"cannot {what} adapter method {self.method!r} on {self.module_name!r}: {reason}"

    # -- per-row routing in one batched matmul (AdapterLayer._stacked_forward) ----------------------
    def can_stack(self) -> bool:
        """True when :meth:`routing_factors` gives this adapter's update right now (default: never)."""
        return False

    def routing_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down (r, in), up (out, r))`` with the forward's update ``x·downᵀ·upᵀ``, the scale folded into ``up``.

        Only called when :meth:`can_stack` is True. With it, per-row routing stacks the factors of the
        K adapters of a layer and applies them in one gather + batched matmul whose op count does not
        grow with K; adapters without it run their own forward on their rows.
        """
        raise TypeError(f"{type(self).__name__} cannot be stacked for per-row routing (can_stack() is False)")

    # -- dtypes -------------------------------------------------------------------------------------
    def align_dtypes(self) -> None:
        """Cast the frozen floating tensors (``frozen_parameters``, buffers) to the dtype of the other parameters.

        With a half-precision base, :func:`~mm_subspace.training_utils.cast_trainable_params` makes
        the trainable parameters float32 masters and leaves frozen ones in half (SuLoRA's and
        AsyLoRA's frozen factor, TS-Mixing's fixed mixer, the SVD buffers), which would then meet a
        float32 factor in one matmul. :class:`AdapterLayer` calls this before every forward: a dtype
        comparison per frozen tensor, and one cast the first time they differ.
        """
        slots = self.__dict__.get("_dtype_slots")
        if slots is None:
            slots = self.__dict__["_dtype_slots"] = self._frozen_tensor_slots() or ()
        if not slots:
            return
        (ref_module, ref_name), frozen = slots
        dtype = ref_module._parameters[ref_name].dtype
        for module, name, is_param in frozen:
            store = module._parameters if is_param else module._buffers
            tensor = store[name]
            if tensor is not None and tensor.dtype != dtype:
                if is_param:
                    tensor.data = tensor.data.to(dtype)
                else:
                    store[name] = tensor.to(dtype)

    def _frozen_tensor_slots(self) -> tuple[tuple[nn.Module, str], list[tuple[nn.Module, str, bool]]] | None:
        """(owner and name of the reference parameter, [(owner, name, is_parameter)] of the frozen floating tensors)."""
        frozen_names = set(self.frozen_parameters)
        reference, frozen = None, []
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if param is None or not param.is_floating_point():
                    continue
                if prefix + name in frozen_names:
                    frozen.append((module, name, True))
                elif reference is None:
                    reference = (module, name)
            frozen += [(module, name, False) for name, buf in module._buffers.items() if buf is not None and buf.is_floating_point()]
        return None if reference is None or not frozen else (reference, frozen)

    # -- auxiliary losses (SuLoRA load balance, MPC regularisers) ------------------------------------
    def record_aux(self, loss: torch.Tensor) -> None:
        """Add ``loss`` to what :func:`mm_subspace.aux_loss` will collect from this adapter."""
        self._aux = loss if self._aux is None else self._aux + loss

    def pop_aux(self) -> torch.Tensor | None:
        """Return and clear the recorded auxiliary loss (None if nothing was recorded)."""
        aux, self._aux = self._aux, None
        return aux

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


class LowRankAdapter(Adapter):
    """Shared A·M·B math: ``ΔW x = (alpha/r) · B · M · A · x`` (MoSLoRA Eq. 7 in column form).

    Subclasses choose the mixer through :meth:`make_mixer` (``None`` = identity = plain LoRA) and may
    put a function between A and B through :meth:`inner`. A uses Kaiming-uniform (a=√5, as LoRA's
    and PEFT's code), B starts at zero so the adapted model equals the base at step 0.
    """

    mixer_trainable: ClassVar[bool] = True
    #: the eval-mode forward is exactly ``x·Aᵀ·(s·up_weight())ᵀ``, so per-row routing may stack this adapter
    #: with others (:meth:`Adapter.routing_factors`). A subclass that overrides ``forward`` or ``inner`` is
    #: not stackable unless it sets ``stackable = True`` itself (TriLoRA: its diagonal core is in ``up_weight``).
    stackable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "stackable" not in cls.__dict__ and (cls.forward is not LowRankAdapter.forward or cls.inner is not LowRankAdapter.inner):
            cls.stackable = False

    def __init__(self, kind: BaseKind, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        super().__init__(kind, base, config, module_name)
        r, dd = self.rank, self.factory
        shape_a, shape_b = self.factor_shapes()
        self.lora_A = nn.Parameter(torch.empty(*shape_a, **dd))
        self.lora_B = nn.Parameter(torch.empty(*shape_b, **dd))
        mixer = self.make_mixer(r, dd)
        if mixer is None:
            self.mixer = None
        elif self.mixer_trainable:
            self.mixer = nn.Parameter(mixer)
        else:
            self.register_buffer("mixer", mixer)
        self.reset_factors()
        # Matrix Pattern Constraints (survey §4.2) for configs derived from LowRankConfig
        self.mpc: str | None = getattr(config, "mpc", None)
        if self.mpc == "nonlinear":
            self.mergeable = False
            self.merge_refusal = (
                f"mpc='nonlinear' puts {config.mpc_activation} between A and B (survey §4.2, MPC_n), so the "
                "update depends on the input and is not a fixed ΔW; train without it to merge or export"
            )

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B``: (r, in) and (out, r) here."""
        return (self.rank, self.in_features), (self.out_features, self.rank)

    def make_mixer(self, r: int, dd: dict[str, Any]) -> torch.Tensor | None:
        """The r×r mixer at init, or ``None`` for no mixer (identity)."""
        return None

    def reset_factors(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if self.config.init_weights:
                nn.init.zeros_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        """Applied to the rank-r activation between A (and the mixer) and B: identity, or MPC_n's σ."""
        if self.mpc == "nonlinear":
            return activation(self.config.mpc_activation)(h)
        return h

    def record_mpc(self) -> None:
        """During training, record ``mpc_coef ·`` MPC_o / MPC_d of (``lora_A``, ``lora_B``) for :func:`mm_subspace.aux_loss`."""
        if self.mpc in ("orthogonal", "diagonal") and training_forward(self):
            record_once(self, self.config.mpc_coef * MPC_PENALTIES[self.mpc](self.lora_A, self.lora_B))

    def up_weight(self) -> torch.Tensor:
        """The (out, r) matrix that multiplies the rank-r activation: B, or B·M with a mixer."""
        return self.lora_B if self.mixer is None else self.lora_B @ self.mixer

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, **context: Any) -> torch.Tensor:
        # Cheapest order for an input of n tokens: (r·in + r·r + out·r)·n, never materialising ΔW.
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if self.mixer is not None:
            h = F.linear(h, self.mixer)
        h = self.inner(h) * self.total_scale
        self.record_mpc()
        return base_out + F.linear(h, self.lora_B).to(base_out.dtype)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.mergeable:
            raise MergeError(self._refusal("export to plain LoRA"))
        return self.lora_A, self.up_weight()

    def can_stack(self) -> bool:
        # training mode keeps its own forward: dropout and the MPC penalties act there
        return self.stackable and not self.training and self.mpc != "nonlinear"

    def routing_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.up_weight() * self.total_scale

    def delta_weight(self) -> torch.Tensor:
        down, up = self.lora_factors()
        return (up @ down) * self.total_scale


def batch_dim_of(model: nn.Module, module_name: str) -> int:
    """Which input dimension holds the batch for the module ``module_name`` of ``model``: 0 or 1.

    Walks up from the module's parent: the first ancestor with a boolean ``batch_first`` attribute
    (``nn.Transformer``, open_clip's ``Transformer``, whose blocks then see (seq, batch, d) when it is
    False), or with an ``nn.MultiheadAttention`` child (``nn.TransformerEncoderLayer``, open_clip's
    ``ResidualAttentionBlock``: the whole block sees what its attention sees), decides. Default 0.
    """
    parts = module_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth])) if depth else model
        flag = getattr(ancestor, "batch_first", None)
        if isinstance(flag, bool):
            return 0 if flag else 1
        for name, child in ancestor.named_children():
            if name == parts[depth]:
                continue  # the branch we came from
            mha = child.base_layer if isinstance(child, AdapterLayer) else child
            if isinstance(mha, nn.MultiheadAttention):
                return 0 if mha.batch_first else 1
    return 0


class AdapterLayer(nn.Module):
    """Wraps one base module and holds its adapters by name (``adapters``, a ModuleDict).

    ``forward`` runs the base once, then each active, unmerged adapter in order; with
    ``adapter_rows`` in the shared context, each batch row goes through its own adapter only.
    """

    def __init__(self, base_layer: nn.Module, kind: BaseKind, state: ModelState, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        # plain attributes, not submodules: they must not appear in state_dict
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "module_name", module_name)
        self.train(base_layer.training)  # injected into an eval model: eval too (no adapter dropout)

    # ``in_features``/``weight`` pass-throughs keep code that inspects the layer working
    @property
    def in_features(self) -> int:
        return self.kind.in_features(self.base_layer)

    @property
    def out_features(self) -> int:
        return self.kind.out_features(self.base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.apply_adapters(x, self.base_layer(x, *args, **kwargs))

    def apply_adapters(self, x: torch.Tensor, out: torch.Tensor, **extra: Any) -> torch.Tensor:
        """The active adapters applied to base output ``out`` of input ``x``; ``extra`` reaches every adapter
        (layers with their own forward, e.g. :class:`mm_subspace.fused.MultiheadAttentionLayer`, call this)."""
        state = self.state
        if state.disabled or not state.active:
            return out
        context = {**state.context, **extra} if extra else state.context
        if "adapter_rows" in context:
            return self._routed_forward(x, out, context)
        for name in state.active:
            if name in self.adapters and name not in self.merged:
                adapter = self.adapters[name]
                adapter.align_dtypes()
                out = adapter(x, out, **context)
        return out

    #: the dimension of this layer's input that holds the batch rows, for per-row routing: 0, or 1 inside
    #: a sequence-first block (``nn.TransformerEncoderLayer(batch_first=False)``, open_clip's
    #: ``Transformer(batch_first=False)``); set on injection by :func:`batch_dim_of`
    batch_dim: int = 0
    #: True for layers that bring their adapters' inputs to batch-first themselves (no detection)
    fixed_batch_dim: bool = False
    #: per-row routing stacks the stackable adapters into one batched matmul (:meth:`_stacked_forward`);
    #: set ``AdapterLayer.stacked_routing = False`` to run every adapter's own forward on its rows instead
    #: (the reference the stacked path is tested against; ``benchmarks/batched_generation.py`` compares both)
    stacked_routing: ClassVar[bool] = True

    def _routed_forward(self, x: torch.Tensor, out: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        """Each batch row through its own adapter (``adapter_rows``); the base output ``out`` is computed once.

        Rows of stackable adapters (:meth:`Adapter.can_stack`: LoRA, MoSLoRA, TS-Mixing, AsyLoRA,
        TriLoRA, FLoRA in eval mode) go through :meth:`_stacked_forward`, one gather + batched matmul
        for all of them; the rows of any other adapter through its own forward, one call per adapter
        (as PEFT's ``_mixed_batch_forward``).
        """
        if self.merged:
            raise AdapterStateError(
                f"per-row adapter routing on {self.module_name!r} while {self.merged} is merged into the "
                "weight; call mm_subspace.unmerge(model) first"
            )
        dim = self.batch_dim
        if x.dim() < dim + 2:
            raise AdapterStateError(
                f"per-row adapter routing on {self.module_name!r}: it runs inside a sequence-first block "
                f"(batch in dimension {dim}), but got an input of shape {tuple(x.shape)} without a batch dimension there; "
                "route batched inputs only"
            )
        batch = x.shape[dim]
        extras = {k: v for k, v in context.items() if k != "adapter_rows"}
        groups = self.state.row_groups(batch, x.device)
        if len(groups) == 1:  # every row has the same owner: no gather/scatter
            name = next(iter(groups))
            if name not in self.adapters:
                return out
            adapter = self.adapters[name]
            adapter.align_dtypes()
            return adapter(x, out, **extras)
        stacked, looped, first = [], [], None
        modules = self.adapters._modules  # plain dict: this loop runs for every layer of every routed call
        for name, rows in groups.items():
            adapter = modules.get(name) if name is not None else None
            if adapter is None or rows.numel() == 0:
                continue
            adapter.align_dtypes()
            if self.stacked_routing and adapter.can_stack():  # stack adapters of one dtype and device
                param = next(iter(adapter._parameters.values()))
                first = first or (param.dtype, param.device)
                if (param.dtype, param.device) == first:
                    stacked.append(name)
                    continue
            looped.append(name)
        # one output tensor, written in place per looped group (not one copy per group)
        result = self._stacked_forward(x, out, tuple(stacked)) if stacked else None
        for name in looped:
            rows = groups[name]
            sub = {  # context tensors (attention_mask, ...) are always batch-first
                k: v.index_select(0, rows) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v
                for k, v in extras.items()
            }
            new = self.adapters[name](x.index_select(dim, rows), out.index_select(dim, rows), **sub)
            result = out.clone() if result is None else result
            result.index_copy_(dim, rows, new.to(result.dtype))
        return out if result is None else result

    def _stacked_forward(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """``out + x·downᵀ·upᵀ`` per row with the row owner's factors: one gather and two batched matmuls.

        The K adapters' :meth:`Adapter.routing_factors` are stacked into ``down`` (K+1, in, R) and
        ``up`` (K+1, R, out) — ranks below the largest R padded with zeros (exact), the scale folded into
        ``up``, slot K all zero for rows of the base or of a non-stacked adapter — and each row picks its
        slot. The op count does not depend on K. Rows of the base come out exactly as ``out``.
        """
        down, up = self._stacked_factors(names)
        slots = self.state.row_slots(x.shape[self.batch_dim], x.device, names)
        dim = self.batch_dim
        xb, ob = (x, out) if dim == 0 else (x.movedim(dim, 0), out.movedim(dim, 0))
        batch = xb.shape[0]
        h = torch.bmm(xb.reshape(batch, -1, xb.shape[-1]).to(down.dtype), down.index_select(0, slots))
        up_rows = up.index_select(0, slots)
        if dim == 0 and h.dtype == out.dtype:  # the add fused into the second matmul
            return torch.baddbmm(out.reshape(batch, -1, out.shape[-1]), h, up_rows).view(out.shape)
        delta = torch.bmm(h, up_rows).reshape(ob.shape)
        return out + (delta if dim == 0 else delta.movedim(0, dim)).to(out.dtype)

    def _stacked_factors(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down (K+1, in, R), up (K+1, R, out))`` of the adapters ``names``, cached while nothing changes.

        The cache is used only without autograd (``torch.no_grad``/``inference_mode``: generation) and
        is keyed on the adapters' scales and on the storage and version counter of each of their
        tensors, so a training step, ``load_adapter``, ``set_scale`` or ``.to()`` refreshes it. (Writes
        through ``param.data`` bypass the version counter: write adapter weights under ``torch.no_grad()``,
        as every mm_subspace function does, or call :meth:`clear_routing_cache`.)
        """
        modules = self.adapters._modules
        adapters = [modules[n] for n in names]
        if torch.is_grad_enabled():
            return self._stack(adapters)
        key: list[Any] = [names, torch.is_inference_mode_enabled()]
        tensors = [t for a in adapters for store in (a._parameters, a._buffers) for t in store.values() if t is not None]
        try:
            key += [a.total_scale for a in adapters] + [(t.data_ptr(), t._version) for t in tensors]
        except RuntimeError:  # an inference tensor (made under inference_mode) has no version counter to key on
            return self._stack(adapters)
        cached = self.__dict__.get("_stack_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        stacked = self._stack(adapters)
        # the detached tensors keep the keyed storages alive, so a data_ptr can't be reused by a new one
        self.__dict__["_stack_cache"] = (key, stacked, [t.detach() for t in tensors])
        return stacked

    @staticmethod
    def _stack(adapters: list[Adapter]) -> tuple[torch.Tensor, torch.Tensor]:
        factors = [a.routing_factors() for a in adapters]
        rank = max(down.shape[0] for down, _ in factors)
        downs = [down.T if down.shape[0] == rank else F.pad(down.T, (0, rank - down.shape[0])) for down, _ in factors]
        ups = [up.T if up.shape[1] == rank else F.pad(up.T, (0, 0, 0, rank - up.shape[1])) for _, up in factors]
        return torch.stack(downs + [torch.zeros_like(downs[0])]), torch.stack(ups + [torch.zeros_like(ups[0])])

    def clear_routing_cache(self) -> None:
        """Drop the cached stacked factors of per-row routing (rebuilt on the next routed call).

        Needed only after writing adapter tensors through ``param.data``, which the cache cannot see.
        """
        self.__dict__.pop("_stack_cache", None)

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterLayer:
        self.clear_routing_cache()  # .to()/.half()/.cuda(): the stacked copies follow on next use
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: the stacked copies are rebuilt on use
        state = super().__getstate__()
        state.pop("_stack_cache", None)
        return state

    # -- merge ----------------------------------------------------------------------------------------
    def merge(self, names: list[str], exact: bool = False) -> None:
        """Fold the named adapters into the base weight, in order.

        ``exact``: first keep a copy of the base parameters, so that :meth:`unmerge` restores them
        bit for bit (costs one copy of this layer's weights while merged). Without it, unmerge
        subtracts ΔW again, which in fp16/bf16 leaves 1-2 ulp of rounding in many weights per round trip.
        """
        for name in names:
            if name not in self.adapters or name in self.merged:
                continue
            adapter = self.adapters[name]
            if not adapter.mergeable:
                raise MergeError(adapter._refusal("merge"))
        if exact and "_unmerged" not in self.__dict__ and any(n in self.adapters and n not in self.merged for n in names):
            params = dict(self.base_layer.named_parameters())
            if not all(p.is_floating_point() for p in params.values()):
                raise MergeError(
                    f"merge(exact=True) on {self.module_name!r}: the base weights are quantised, and re-quantising "
                    "a restored copy is not exact; merge without exact=True (unmerge then subtracts ΔW)"
                )
            self.__dict__["_unmerged"] = {n: p.detach().clone() for n, p in params.items()}
        for name in names:
            if name not in self.adapters or name in self.merged:
                continue
            adapter = self.adapters[name]
            with torch.no_grad():
                if adapter.merges_weight:
                    weight = self.kind.weight(self.base_layer)
                    self.kind.set_weight(self.base_layer, adapter.merge_weight(weight.float()))
                self._write_bias(name, adapter, merging=True)
            self.merged.append(name)

    def unmerge(self) -> None:
        """Restore the base weight, undoing merges in reverse order (exactly, after ``merge(exact=True)``)."""
        saved = self.__dict__.pop("_unmerged", None)
        if saved is not None:
            if self.__dict__.get("_bias_owner") is not None:  # a bias that merging created
                self.base_layer.bias = None
                self.__dict__["_bias_owner"] = None
            with torch.no_grad():
                for n, param in self.base_layer.named_parameters():
                    param.copy_(saved[n])
            self.merged.clear()
            return
        while self.merged:
            name = self.merged.pop()
            adapter = self.adapters[name]
            with torch.no_grad():
                if adapter.merges_weight:
                    weight = self.kind.weight(self.base_layer)
                    self.kind.set_weight(self.base_layer, adapter.unmerge_weight(weight.float()))
                self._write_bias(name, adapter, merging=False)

    def _write_bias(self, name: str, adapter: Adapter, merging: bool) -> None:
        """Apply ``adapter.merge_bias``/``unmerge_bias`` to the base bias (no-op when it returns its input).

        A bias-less base gets a new frozen bias on merge; undoing that merge removes it again.
        """
        bias = self.bias
        if not merging and self.__dict__.get("_bias_owner") == name:
            self.base_layer.bias = None
            self.__dict__["_bias_owner"] = None
            return
        current = None if bias is None else bias.detach().float()
        new = (adapter.merge_bias if merging else adapter.unmerge_bias)(current)
        if new is current:
            return
        if bias is None:
            dtype = self.kind.float_dtype(self.base_layer)
            self.base_layer.bias = nn.Parameter(new.to(dtype), requires_grad=False)
            self.__dict__["_bias_owner"] = name
        else:
            bias.data.copy_(new.to(bias.dtype))

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        adapter.attach(self)
        adapter.train(self.training)
        self.adapters[name] = adapter

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, kind={self.kind.name}, merged={self.merged}"
