"""Base configuration shared by every method.

Configs are dataclasses with ``field(metadata={"help": ...})`` per field (as in PEFT); each method
subclasses :class:`AdapterConfig` in its own file and sets the class variable ``method``.
``__post_init__`` validates, so a bad value fails when the config is built, before any model is touched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError
from .patterns import compile_pattern, pattern_matches

TargetSpec = str | list[str] | tuple[str, ...] | None


def check_choice(what: str, value: Any, choices: Iterable[Any], allow_none: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices`` (or ``None`` with ``allow_none``).

    The message names ``what`` (e.g. ``"moslora: mixer_init"``), the allowed values and the value given.
    """
    allowed = tuple(sorted(choices) if isinstance(choices, dict) else choices)
    if value is None and allow_none:
        return
    try:
        ok = value in allowed
    except TypeError:
        ok = False
    if not ok:
        none = "None or " if allow_none else ""
        raise ConfigError(f"{what} must be {none}one of {allowed}, got {value!r}")

#: slices of a fused projection that can carry their own adapter (``o``: nn.MultiheadAttention's out_proj)
FUSED_PARTS = ("q", "k", "v", "o")


@dataclass
class AdapterConfig:
    """Fields common to all adapter methods.

    Args:
        rank: r, the inner dimension of the low-rank factors (ignored by methods without one).
        alpha: the update is scaled by ``alpha / rank`` (LoRA's convention; PEFT's ``lora_alpha``).
        dropout: dropout probability on the adapter's input (PEFT's ``lora_dropout``).
        targets: which modules to adapt: a preset name (``"llama"``, ``"sdxl_unet"``; see
            :mod:`mm_subspace.presets`), a regular expression matched against the full module
            name, or a list of names each matched exactly or as a dotted suffix (``"q_proj"``
            matches ``model.layers.0.self_attn.q_proj``).
        rank_pattern / alpha_pattern: per-module overrides, ``{regex: value}``; a key matches a
            module whose name ends with it (PEFT semantics).
        init_weights: ``True`` initialises so the adapted model equals the base at step 0 (B = 0);
            ``False`` draws every factor at random (for tests and for loading weights over it).
        dtype: dtype of the adapter parameters (``"float32"``, ``"bfloat16"``, ...); ``None`` takes
            the base weight's dtype, or float32 when the base is quantised.
    """

    method: ClassVar[str] = ""
    #: values of fields a saved config may lack because it was written before the field existed, when
    #: they differ from today's default (so an old adapter keeps its meaning); see :meth:`from_dict`
    absent_field_values: ClassVar[dict[str, Any]] = {}
    #: methods whose layers hold an A·B pair; MPC constraints and plain-LoRA export need it
    low_rank: ClassVar[bool] = True
    #: methods that keep a per-row weight magnitude (DoRA Eq. 5): PEFT's ``use_dora`` layout carries it,
    #: plain LoRA / kohya files have no slot for it
    has_magnitude: ClassVar[bool] = False

    rank: int = field(default=8, metadata={"help": "inner rank r of the low-rank factors"})
    alpha: float = field(default=8.0, metadata={"help": "scale numerator: ΔW is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    targets: TargetSpec = field(
        default=None, metadata={"help": "preset name, regex, or list of exact names / dotted suffixes"}
    )
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "{regex: rank} overrides"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "{regex: alpha} overrides"})
    init_weights: bool = field(default=True, metadata={"help": "True: step 0 equals the base model"})
    dtype: str | None = field(default=None, metadata={"help": "adapter parameter dtype; None = base dtype"})
    fused_slices: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={"help": "{regex: slices}: fused q/k/v projections adapted per slice (q, k, v; o = MHA out_proj); see mm_subspace.fused"},
    )
    trainable_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "names/dotted suffixes of modules trained fully and saved with the adapter (PEFT's modules_to_save)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not (self.targets is None or isinstance(self.targets, str)
                or (isinstance(self.targets, list) and all(isinstance(t, str) for t in self.targets))):
            raise ConfigError(f"{self.method}: targets must be a preset name, a regex or a list of module names, got {self.targets!r:.100}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"{self.method}: rank must be a positive integer, got {self.rank!r}")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{self.method}: rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout!r}")
        self._check_fused_and_trainable()
        self._check_numbers_and_patterns()
        if self.dtype is not None:
            import torch

            if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
                raise ConfigError(f"{self.method}: dtype {self.dtype!r} is not a torch dtype name (e.g. 'float32')")

    def _check_numbers_and_patterns(self) -> None:
        """Every number in the config is finite (a NaN/inf alpha would make every output NaN), and every
        pattern key compiles (bounded length; matched with a timeout, see :func:`pattern_matches`)."""
        def bad(value: Any) -> bool:
            return isinstance(value, float) and not math.isfinite(value)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            items = value.items() if isinstance(value, dict) else [(None, v) for v in value] if isinstance(value, list) else [(None, value)]
            for key, item in items:
                if bad(item):
                    where = f"{f.name}[{key!r}]" if key is not None else f.name
                    raise ConfigError(f"{self.method}: {where} must be a finite number, got {item!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"{self.method}: alpha must be a number, got {self.alpha!r}")
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{self.method}: alpha_pattern[{key!r}] must be a number, got {value!r}")
        for field_name in ("rank_pattern", "alpha_pattern", "fused_slices"):
            for key in getattr(self, field_name):
                compile_pattern(key, f"{self.method}: {field_name} key")
        if isinstance(self.targets, str):
            compile_pattern(self.targets, f"{self.method}: targets")

    def _check_fused_and_trainable(self) -> None:
        if isinstance(self.trainable_modules, str):
            self.trainable_modules = [self.trainable_modules]
        self.trainable_modules = list(self.trainable_modules or [])
        slices = {}
        for key, value in dict(self.fused_slices or {}).items():
            parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
            bad = [p for p in parts if p not in FUSED_PARTS]
            if not parts or bad or len(set(parts)) != len(parts):
                raise ConfigError(
                    f"{self.method}: fused_slices[{key!r}] = {value!r} must list distinct slices out of {FUSED_PARTS}, "
                    "e.g. {'qkv': ['q', 'v']} (o = the out_proj of an nn.MultiheadAttention)"
                )
            slices[key] = parts
        self.fused_slices = slices

    # -- per-module values ---------------------------------------------------------------------
    @staticmethod
    def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
        for key, value in pattern.items():
            if pattern_matches(rf"(.*\.)?({key})$", module_name, f"pattern key {key!r:.120}", full=False):
                return value
        return default

    def rank_for(self, module_name: str) -> int:
        """The rank used for ``module_name`` (``rank_pattern`` first, else ``rank``)."""
        return int(self._pattern_value(self.rank_pattern, module_name, self.rank))

    def slices_for(self, module_name: str) -> list[str] | None:
        """The fused slices adapted separately in ``module_name`` (``fused_slices``), or ``None``."""
        return self._pattern_value(self.fused_slices, module_name, None)

    def alpha_for(self, module_name: str) -> float:
        """The alpha used for ``module_name`` (``alpha_pattern`` first, else ``alpha``)."""
        return float(self._pattern_value(self.alpha_pattern, module_name, self.alpha))

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with the method name under ``"method"``."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def frozen_factor(self) -> str | None:
        """``"A"`` or ``"B"``: the low-rank factor that stays frozen at its init (AsyLoRA, SuLoRA), so only the other
        one trains; ``None`` when both train or the method has no such pair (LoRA, DoRA, IA3, ...)."""
        return None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Build the right config subclass from :meth:`to_dict` output; unknown fields are an error."""
        from .registry import get_method

        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError("adapter config must be a JSON object with a 'method' field")
        data = dict(data)
        cls = get_method(data.pop("method")).config_class
        unknown = set(data) - cls.field_names()
        if unknown:
            raise ConfigError(
                f"unknown field(s) {sorted(unknown)} for method {cls.method!r}; "
                f"valid fields: {sorted(cls.field_names())}. Was it written by a newer mm_subspace?"
            )
        try:
            return cls(**{**cls.absent_field_values, **data})
        except TypeError as err:  # wrong value types that __post_init__ did not catch
            raise ConfigError(f"invalid config for method {cls.method!r}: {err}") from None

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with ``changes`` applied (re-validated)."""
        return dataclasses.replace(self, **changes)


MPC_MODES = ("orthogonal", "diagonal", "nonlinear")


@dataclass
class LowRankConfig(AdapterConfig):
    """Fields shared by the A·B-shaped methods (lora, moslora, ts_mixing, asylora, sulora, flora, trilora).

    Args:
        mpc: Matrix Pattern Constraint from the subspace-tuning survey (§4.2): ``"orthogonal"``
            (MPC_o, Eq. 20), ``"diagonal"`` (MPC_d, Eq. 21), ``"nonlinear"`` (MPC_n: a nonlinearity
            between A and B; the adapter then cannot be merged or exported as plain LoRA), or ``None``.
            See :mod:`mm_subspace.losses` for the orientation in our (r, in)/(out, r) shapes.
        mpc_coef: weight of the MPC_o/MPC_d penalty added to :func:`mm_subspace.aux_loss` (the survey
            gives no value; PEFT's AdaLoRA orthogonality weight defaults to 0.5).
        mpc_activation: the nonlinearity of ``mpc="nonlinear"`` (one of ``mm_subspace.losses.ACTIVATIONS``).
    """

    mpc: str | None = field(default=None, metadata={"help": f"matrix pattern constraint: None or one of {MPC_MODES}"})
    mpc_coef: float = field(default=0.1, metadata={"help": "weight of the MPC penalty in mm_subspace.aux_loss"})
    mpc_activation: str = field(default="relu", metadata={"help": "nonlinearity for mpc='nonlinear'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from .losses import ACTIVATIONS

        check_choice(f"{self.method}: mpc", self.mpc, MPC_MODES, allow_none=True)
        if isinstance(self.mpc_coef, bool) or not isinstance(self.mpc_coef, (int, float)) or self.mpc_coef < 0:
            raise ConfigError(f"{self.method}: mpc_coef must be a number >= 0, got {self.mpc_coef!r}")
        check_choice(f"{self.method}: mpc_activation", self.mpc_activation, ACTIVATIONS)
