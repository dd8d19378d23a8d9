"""The one injection mechanism and the model-level controls.

``inject(model, config, adapter_name)`` matches target modules, validates everything, and only then
replaces each target with an :class:`~mm_subspace.layer.AdapterLayer` on its parent (a failure never
leaves a half-injected model). The other functions switch, disable, scale, merge and remove
adapters on a model injected this way.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from . import presets
from .bases import BaseKind, find_base, register_base, supported_types
from .config import FUSED_PARTS, AdapterConfig
from .errors import AdapterStateError, ConfigError, MergeError, TargetError
from .fused import PART_KIND, FusedAdapter, FusedPart, MultiheadAttentionKind
from .layer import Adapter, AdapterLayer, ModelState, batch_dim_of
from .patterns import compile_pattern, pattern_matches
from .presets import with_preset_defaults
from .quant import Linear4bitKind
from .registry import get_method
from .targets import base_of, candidate_modules

logger = logging.getLogger(__name__)
STATE_ATTR = "_mm_subspace_state"

# The base kinds beyond nn.Linear (which mm_subspace.bases registers itself), registered here, in the
# one module above bases, fused and quant that every user of find_base imports: the readers live in
# their own modules and bases imports none of them. Each goes first, so the more specific type wins
# (Linear4bit is an nn.Linear subclass). bitsandbytes is only imported when such a layer is met.
register_base(MultiheadAttentionKind())
register_base(Linear4bitKind())


# -- lookup helpers ---------------------------------------------------------------------------------
def get_state(model: nn.Module, required: bool = True) -> ModelState | None:
    """The shared :class:`ModelState` of an injected model."""
    state = getattr(model, STATE_ATTR, None)
    if state is None and required:
        raise AdapterStateError(
            f"{type(model).__name__} has no mm_subspace adapters; call mm_subspace.inject(model, config) "
            "or mm_subspace.load_adapter(model, path) first"
        )
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(module name, layer) for every :class:`AdapterLayer` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def iter_adapters(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, Adapter]]:
    """(module name, adapter) for every adapter (or only those called ``adapter_name``)."""
    for name, layer in adapter_layers(model):
        for key, adapter in layer.adapters.items():
            if adapter_name is None or key == adapter_name:
                yield name, adapter


def _hint(target: str, names: list[str]) -> str:
    leaves = sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
    close = difflib.get_close_matches(target, leaves, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def resolve_targets(model: nn.Module, targets: Any) -> list[str]:
    """Full names of the modules ``targets`` selects (preset name, regex, or list of names/suffixes)."""
    modules = candidate_modules(model)
    names = list(modules)
    if targets is None or (isinstance(targets, (list, tuple)) and not targets):
        raise ConfigError(
            "config.targets is empty: give a preset name (one of "
            f"{', '.join(presets.list_presets())}), a regex, or a list of module names"
        )
    if isinstance(targets, str):
        preset = presets.get_preset(targets, required=False)
        if preset is not None:
            return preset.resolve(model)
        try:
            compile_pattern(targets, "targets")
        except ConfigError as err:
            raise ConfigError(f"targets {targets!r:.120} is neither a preset nor a valid regex: {err}") from None
        matched = [n for n in names if pattern_matches(targets, n, "target regex")]
        if not matched:
            raise TargetError(
                f"target regex {targets!r} matched no module of {type(model).__name__} (it must match the "
                f"full dotted name, e.g. {names[-1]!r}){_hint(targets, names)}. Presets: "
                f"{', '.join(presets.list_presets())}"
            )
        return matched
    matched = []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise TargetError(
                f"target {target!r} matched no module of {type(model).__name__}{_hint(target, names)} "
                f"(targets match a full name or a dotted suffix; see mm_subspace.presets for ready lists)"
            )
        matched.extend(h for h in hits if h not in matched)
    return matched


# -- inject -----------------------------------------------------------------------------------------
def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to ``model`` in place, and freeze the base.

    The first adapter injected becomes active; later ones are added inactive (switch with
    :func:`set_adapter`). Returns ``model``.

    Raises:
        ConfigError: bad config or an empty target list.
        TargetError: a target matched nothing, matched an unsupported layer type, or the rank is
            larger than a layer allows.
        AdapterStateError: an adapter called ``adapter_name`` already exists.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config must be an AdapterConfig (e.g. mm_subspace.MoSLoRAConfig), got {type(config).__name__}")
    check_adapter_name(adapter_name)
    _refuse_peft_model(model)
    config = with_preset_defaults(config)
    adapter_cls = get_method(config.method)
    state = get_state(model, required=False)
    if state is not None and adapter_name in state.configs:
        raise AdapterStateError(
            f"an adapter named {adapter_name!r} already exists on this model; pass another adapter_name, "
            f"or call mm_subspace.remove_adapter(model, {adapter_name!r}) first"
        )
    modules = candidate_modules(model)
    targets = resolve_targets(model, config.targets)
    plan = []
    for name in targets:
        module = modules[name]
        base = base_of(module)
        kind = find_base(base)
        if kind is None:
            raise TargetError(
                f"target {name!r} is a {type(base).__name__}, which mm_subspace cannot wrap (supported: "
                f"{', '.join(supported_types())}); target its linear sub-layers instead"
                f"{_child_hint(name, base)}"
            )
        check_adapter(kind, adapter_cls, base, config, name)
        plan.append((name, module, base, kind))
    _check_trainable_modules(model, config, adapter_name)
    # build every adapter before touching the model: a constructor error leaves it unchanged
    built = [build_adapter(kind, adapter_cls, base, config, name) for name, _, base, kind in plan]

    # everything validated: now mutate (and should anything still fail, undo it all)
    with rollback(model):
        if state is None:
            state = ModelState()
            setattr(model, STATE_ATTR, state)
        state.configs[adapter_name] = config  # first, so that a rollback's remove_adapter finds every layer
        for (name, module, base, kind), adapter in zip(plan, built):
            layer = module
            if not isinstance(module, AdapterLayer):
                layer = kind.wrap(base, state, name)
                if not layer.fixed_batch_dim and batch_dim_of(model, name):
                    object.__setattr__(layer, "batch_dim", 1)  # a plain attribute, as module_name
                if _inside_fastpath_block(model, name):
                    layer.register_forward_pre_hook(_no_fastpath)
                _set_submodule(model, name, layer)
            layer.add_adapter(adapter_name, adapter)
        for param in model.parameters():
            param.requires_grad_(False)
        if not state.active:
            state.active = [adapter_name]
        _refresh_trainable(model, state)
    logger.info("injected %s adapter %r into %d modules", config.method, adapter_name, len(plan))
    return model


# -- which rows are fused ------------------------------------------------------------------------------
def fused_rows(kind: BaseKind, module: nn.Module, config: AdapterConfig, module_name: str) -> dict[str, tuple[int, int]] | None:
    """Slice -> (start, stop) rows adapted separately in ``module``, or ``None`` for one adapter on all of W.

    Raises:
        TargetError: the slices asked for do not exist, or a fused Linear's rows do not split in three.
    """
    asked = config.slices_for(module_name)
    layout = kind.fused_layout(module) if hasattr(kind, "fused_layout") else None
    if layout is None:
        if asked is None:
            return None
        out = kind.out_features(module)
        if out % 3:
            raise TargetError(
                f"fused_slices asks for {asked} in {module_name!r}, but its {out} output rows do not split into "
                "equal q, k, v thirds; drop it from fused_slices (the whole matrix is then adapted as one)"
            )
        d = out // 3
        layout = {p: (i * d, (i + 1) * d) for i, p in enumerate(("q", "k", "v"))}
    chosen = list(layout) if asked is None else asked
    missing = [p for p in chosen if p not in layout]
    if missing:
        raise TargetError(
            f"{module_name!r} ({type(module).__name__}) has fused slices {list(layout)}, not {missing}; "
            f"set fused_slices to a subset of {list(layout)}"
        )
    return {p: layout[p] for p in FUSED_PARTS if p in chosen}


def check_adapter(kind: BaseKind, adapter_cls: type[Adapter], module: nn.Module, config: AdapterConfig, module_name: str) -> None:
    """``adapter_cls.validate`` on ``module``, or on each fused slice it will adapt (before any mutation)."""
    if hasattr(kind, "check"):
        kind.check(module, module_name)
    rows = fused_rows(kind, module, config, module_name)
    if rows is None:
        adapter_cls.validate(kind, module, config, module_name)
        return
    for start, stop in rows.values():
        adapter_cls.validate(PART_KIND, FusedPart(module, kind, start, stop), config, module_name)


def build_adapter(kind: BaseKind, adapter_cls: type[Adapter], module: nn.Module, config: AdapterConfig, module_name: str) -> Adapter:
    """The adapter for ``module``: ``adapter_cls`` itself, or a :class:`FusedAdapter` of one per slice."""
    rows = fused_rows(kind, module, config, module_name)
    if rows is None:
        return adapter_cls(kind, module, config, module_name)
    return FusedAdapter(adapter_cls, kind, module, config, module_name, rows)



#: names an adapter cannot have: attributes of the nn.ModuleDict that holds adapters by name
_RESERVED = frozenset(n for n in dir(nn.ModuleDict()) if not n.startswith("__"))


def check_adapter_name(adapter_name: Any, where: str = "") -> None:
    """Raise :class:`ConfigError` unless ``adapter_name`` can name an adapter.

    Allowed: letters, digits, ``_`` and ``-``, and not an attribute of ``nn.ModuleDict`` (``forward``,
    ``keys``, ``to``, ``type``, ``pop``, ...), which would clash with the container holding adapters by name.
    """
    ok = isinstance(adapter_name, str) and re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name) is not None
    if not ok:
        raise ConfigError(
            f"{where}adapter name {adapter_name!r} must be a non-empty string of letters, digits, '_' or '-'")
    if adapter_name in _RESERVED:
        raise ConfigError(
            f"{where}adapter name {adapter_name!r} is reserved (an attribute or method of nn.ModuleDict, which holds "
            f"adapters by name); pick another, e.g. {adapter_name + '_adapter'!r}")


def _refuse_peft_model(model: nn.Module) -> None:
    """A model already wrapped by PEFT (PeftModel, or carrying PEFT tuner layers) gets a clear error."""
    peft_layers = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners")]
    if hasattr(model, "peft_config") or peft_layers:
        what = type(model).__name__ if hasattr(model, "peft_config") else f"a model with PEFT layers ({peft_layers[0]!r}, ...)"
        raise ConfigError(
            f"{what} is wrapped by PEFT; mm_subspace adapts the plain model. Unwrap it first "
            "(peft_model.unload(), or merge_and_unload() to keep its LoRA baked in), or save the PEFT adapter and "
            "load it with mm_subspace.import_peft(plain_model, folder)"
        )


@contextlib.contextmanager
def rollback(*models: nn.Module) -> Iterator[None]:
    """If the block raises, put each model back as it was: adapters added inside the block are removed
    (layers left without adapters get their base module back), the active list and the disabled flag
    are restored, and every parameter's ``requires_grad`` flag is set back."""
    saved = []
    for model in models:
        state = get_state(model, required=False)
        saved.append((
            model,
            set(state.configs) if state else set(),
            (list(state.active), state.disabled) if state else None,
            [(p, p.requires_grad) for p in model.parameters()],
        ))
    try:
        yield
    except BaseException:
        for model, names, switches, flags in saved:
            state = get_state(model, required=False)
            for name in [n for n in (state.configs if state else {}) if n not in names]:
                remove_adapter(model, name)
            state = get_state(model, required=False)
            if state is not None and switches is not None:
                state.active, state.disabled = [a for a in switches[0] if a in state.configs], switches[1]
            for param, flag in flags:
                param.requires_grad_(flag)
        raise


def _no_fastpath(module: nn.Module, args: Any) -> None:
    """No-op pre-hook: its presence keeps ``nn.TransformerEncoderLayer`` off its fused inference fast path."""


def _inside_fastpath_block(model: nn.Module, name: str) -> bool:
    """Whether ``name`` lies in an ``nn.TransformerEncoderLayer``, whose eval/no-grad fast path reads the raw
    weights of its linears and attention (``torch._transformer_encoder_layer_fwd``) and would skip adapters;
    a hook on any submodule turns that path off."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:d])) if d else model, nn.TransformerEncoderLayer)
               for d in range(len(parts)))


def _child_hint(name: str, module: nn.Module) -> str:
    children = [n for n, m in module.named_modules() if n and find_base(m) is not None]
    return f", e.g. {', '.join(repr(f'{name}.{c}') for c in children[:4])}" if children else ""


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _refresh_trainable(model: nn.Module, state: ModelState) -> None:
    """Parameters of active adapters train, except those the method freezes; all else is frozen.

    The ``trainable_modules`` of active adapters train fully (their own weights, not adapters inside).
    """
    for _, layer in adapter_layers(model):
        for key, adapter in layer.adapters.items():
            for pname, param in adapter.named_parameters():
                param.requires_grad_(key in state.active and pname not in adapter.frozen_parameters)
    active = {key for key in state.active if key in state.configs}
    on = {k for key in active for k in trainable_module_state(model, state.configs[key])}
    for config in state.configs.values():
        for key, param in trainable_module_state(model, config).items():
            param.requires_grad_(key in on)


TRAINABLE_PREFIX = "trainable_modules."


def trainable_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules ``config.trainable_modules`` selects (exact names or dotted suffixes)."""
    return resolve_targets(model, config.trainable_modules) if config.trainable_modules else []


def _check_trainable_modules(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
    """Every ``trainable_modules`` entry matches a module whose weights can train (not quantised), and
    no other adapter on the model already trains it (they would overwrite each other's weights)."""
    state = get_state(model, required=False)
    mine = trainable_module_names(model, config)
    for other, other_config in (state.configs.items() if state else []):
        if other == adapter_name:
            continue
        theirs = trainable_module_names(model, other_config)
        shared = [m for m in mine for t in theirs if m == t or m.startswith(t + ".") or t.startswith(m + ".")]
        if shared:
            raise AdapterStateError(
                f"adapter {adapter_name!r} lists trainable_modules {shared[:3]} that adapter {other!r} already trains. "
                "Fully trained modules are trained in place, so two adapters would overwrite each other's weights "
                "(and routing, disabling or removing one would not give the other's or the base's module back). "
                f"Give the adapters disjoint trainable_modules, or remove_adapter(model, {other!r}) first"
            )
    frozen = [k for k, p in trainable_module_state(model, config).items() if not p.is_floating_point()]
    if frozen:
        raise ConfigError(
            f"trainable_modules cannot train {frozen[:3]}: the weights are quantised (not floating point). Keep "
            "those modules in full precision (load_4bit(..., skip_modules=[...]) / llm_int8_skip_modules), or "
            "adapt them instead of training them fully"
        )


def trainable_module_state(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Parameter]:
    """``"trainable_modules.<module>.<param>" -> parameter`` of the fully trained modules (adapters excluded)."""
    out = {}
    for name in trainable_module_names(model, config):
        for pname, param in model.get_submodule(name).named_parameters():
            if pname.startswith("adapters.") or ".adapters." in pname:
                continue
            out[f"{TRAINABLE_PREFIX}{name}.{pname.replace('base_layer.', '')}"] = param
    return out


# -- switching ----------------------------------------------------------------------------------------
def _check_names(state: ModelState, names: list[str]) -> None:
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; this model has {list(state.configs)}")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapter(s) (applied in the given order); only they train."""
    state = get_state(model)
    names = [names] if isinstance(names, str) else list(names)
    _check_names(state, names)
    state.active = names
    _refresh_trainable(model, state)


def active_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).active)


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter name -> config, for every adapter on ``model``."""
    state = get_state(model, required=False)
    return dict(state.configs) if state else {}


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    """Turn all adapters on or off. Turning off a merged model unmerges it first (with a warning)."""
    state = get_state(model)
    if not enabled and any(layer.merged for _, layer in adapter_layers(model)):
        logger.warning("disabling adapters on a merged model: unmerging first")
        unmerge(model)
    trained = sorted({n for n, c in state.configs.items() if c.trainable_modules})
    if not enabled and trained:
        logger.warning("adapters disabled, but the modules %s trains fully (trainable_modules) keep their trained "
                       "weights: this is not the base model's output", trained)
    state.disabled = not enabled


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model): ...`` runs the base model, then restores the previous state."""
    state = get_state(model)
    before = state.disabled
    enable_adapters(model, False)
    try:
        yield model
    finally:
        state.disabled = before


def set_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """Multiply adapter ``adapter_name``'s update by ``scale`` (1.0 = as trained; 0 = off)."""
    state = get_state(model)
    _check_names(state, [adapter_name])
    if any(adapter_name in layer.merged for _, layer in adapter_layers(model)):
        raise AdapterStateError(f"adapter {adapter_name!r} is merged; unmerge before changing its scale")
    for _, adapter in iter_adapters(model, adapter_name):
        adapter.user_scale = float(scale)


@contextlib.contextmanager
def forward_context(model: nn.Module, adapter_rows: list[str | None] | None = None, **extras: Any) -> Iterator[None]:
    """Per-forward context for the adapter layers of ``model``.

    Args:
        adapter_rows: one adapter name (or ``None`` for the base) per batch row; a batch that is a
            multiple of ``len(adapter_rows)`` is tiled (so classifier-free guidance's doubled batch
            routes correctly). Each row passes through its own adapter only; the base runs once.
        extras: tensors adapters may read, e.g. ``attention_mask`` (batch, seq) for SuLoRA's router.
    """
    state = get_state(model)
    context: dict[str, Any] = dict(extras)
    if adapter_rows is not None:
        rows = list(adapter_rows)
        if not rows:
            raise AdapterStateError("adapter_rows is empty; give one adapter name (or None) per row")
        _check_names(state, [r for r in rows if r is not None])
        trained = sorted({n for n, c in state.configs.items() if c.trainable_modules})
        if trained and len(set(rows)) > 1:
            raise AdapterStateError(
                f"adapter(s) {trained} train whole modules in place (trainable_modules), which every row would "
                "share: per-row routing cannot give each row its own. Route adapters without trainable_modules, "
                "or run one adapter per call (set_adapter)"
            )
        context["adapter_rows"] = rows
    before = state.context
    state.context = context
    try:
        yield
    finally:
        state.context = before


@contextlib.contextmanager
def routing(model: nn.Module, route_mask: torch.Tensor | None, cache: bool = True) -> Iterator[dict[Any, Any] | None]:
    """The one routing rule for training and generation: route once per sequence, on its prompt.

    Inside this context every SuLoRA layer of ``model`` summarises its input over the ``route_mask``
    tokens (batch, seq) — :func:`mm_subspace.methods.sulora.prompt_route_mask` — instead of over all tokens of the call. With
    ``cache=True`` (generation) the first call's choice is kept and reused by the later calls, so the
    KV-cache decode steps (one token each) use the choice made on the prompt in the prefill. Because the
    LM is causal, the prompt positions' inputs are the same in a teacher-forced training forward over
    prompt + answer as in the prefill, so training (``cache=False``, mask from the labels) and
    ``generate`` (``cache=True``, mask = the prompt's attention mask) route identically — tested in
    ``tests/test_visual_instruction.py``. The context is merged into the current forward context
    (per-row ``adapter_rows`` keep working); yields the cache dict (or ``None``).
    """
    from .methods.sulora import ROUTE_CACHE, ROUTE_MASK

    state = get_state(model)
    before = state.context
    store: dict[Any, Any] | None = {} if cache else None
    state.context = {**before, ROUTE_MASK: route_mask, ROUTE_CACHE: store}
    try:
        yield store
    finally:
        state.context = before


def aux_loss(model: nn.Module, reset: bool = True) -> torch.Tensor:
    """Sum of the auxiliary losses adapters recorded since the last call (SuLoRA balance, MPC).

    Each method scales its own term by its config coefficient. ``reset=True`` clears them, so call
    it once per optimisation step and add the result to the task loss. Returns a scalar (0 if none).
    """
    total: torch.Tensor | None = None
    for _, adapter in iter_adapters(model):
        aux = adapter.pop_aux() if reset else adapter._aux
        if aux is not None:
            total = aux if total is None else total + aux.to(total.device)
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else "cpu")
    return total


# -- merge ------------------------------------------------------------------------------------------
def merge(model: nn.Module, adapter_names: list[str] | None = None, exact: bool = False) -> None:
    """Fold the adapters (default: the active ones) into the base weights. Outputs are unchanged.

    Args:
        exact: keep a copy of each merged layer's base weights so that :func:`unmerge` restores them
            bit for bit. The default (``False``) keeps no copy: unmerge computes ``W' − ΔW``, exact in
            float32 up to rounding, but in fp16/bf16 each merge/unmerge round trip moves about a third
            of the weights by 1-2 ulp (and it accumulates over many cycles).
    """
    state = get_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    _check_names(state, names)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:  # validate all before touching any weight
        for name in names:
            if name in layer.adapters and not layer.adapters[name].mergeable:
                raise MergeError(layer.adapters[name]._refusal("merge"))
        if exact and not all(p.is_floating_point() for p in layer.base_layer.parameters()):
            raise MergeError(
                f"merge(exact=True) on {layer.module_name!r}: the base weights are quantised, and re-quantising a "
                "restored copy is not exact; merge without exact=True (unmerge then subtracts ΔW)"
            )
    for layer in layers:
        layer.merge(names, exact=exact)


def unmerge(model: nn.Module) -> None:
    """Restore the base weights of every merged layer."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge, then put the plain base modules back: a stock model with the adapters baked in."""
    merge(model, adapter_names)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter layer, keeping the base weights as they are now (merged or not)."""
    for name, layer in list(adapter_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    return model


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete adapter ``adapter_name``; layers left without adapters get their base module back."""
    state = get_state(model)
    _check_names(state, [adapter_name])
    for name, layer in list(adapter_layers(model)):
        if adapter_name in layer.adapters:
            if layer.merged:
                layer.unmerge()
            del layer.adapters[adapter_name]
        if len(layer.adapters) == 0:
            _set_submodule(model, name, layer.base_layer)
    del state.configs[adapter_name]
    state.active = [a for a in state.active if a != adapter_name]
    if not state.configs:
        delattr(model, STATE_ATTR)
    else:
        _refresh_trainable(model, state)


# -- counting -----------------------------------------------------------------------------------------
def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte: count the logical parameters, as PEFT does
    return param.numel() * 2 if type(param).__name__ == "Params4bit" else param.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted by their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``"<module>.<tensor>" -> tensor`` for one adapter (parameters and persistent buffers)."""
    state = {}
    for module_name, adapter in iter_adapters(model, adapter_name):
        for key, value in adapter.state_dict().items():
            state[f"{module_name}.{key}"] = value
    config = get_state(model).configs.get(adapter_name)
    if config is not None:  # fully trained modules (config.trainable_modules), under "trainable_modules."
        state.update({k: v.detach() for k, v in trainable_module_state(model, config).items()})
    return state


class ParameterCounts(NamedTuple):
    """What :func:`parameter_counts` returns."""

    #: parameters that train now (``requires_grad``): the ones equal-budget comparisons count
    trainable: int
    #: elements the adapter file(s) hold: the trainable adapter tensors plus the frozen ones (AsyLoRA's and
    #: SuLoRA's frozen A, SVD buffers, ...) and fully trained modules (``trainable_modules``)
    stored: int
    #: all parameters of the model (base + adapters), 4-bit weights counted by their logical size
    total: int


def parameter_counts(model: nn.Module, adapter_name: str | None = None) -> ParameterCounts:
    """Trainable, stored and total parameter counts of ``model``.

    ``stored`` is what :func:`mm_subspace.save_adapter` writes for ``adapter_name`` (default: for every
    adapter on the model, summed); ``stored − trainable`` is what an adapter keeps frozen. ``trainable``
    and ``total`` are model-wide, as in :func:`trainable_parameters`.
    """
    trainable, total = trainable_parameters(model)
    state = get_state(model, required=False)
    names = [] if state is None else list(state.configs) if adapter_name is None else [adapter_name]
    if state is not None:
        _check_names(state, names)
    stored = sum(t.numel() for name in names for t in adapter_state_dict(model, name).values())
    return ParameterCounts(trainable, stored, total)


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable params: X || stored adapter params: S || all params: Y || trainable%: Z``.

    PEFT's format plus the adapter's stored count (:func:`parameter_counts`: trainable + frozen adapter tensors).
    """
    counts = parameter_counts(model)
    line = (f"trainable params: {counts.trainable:,d} || stored adapter params: {counts.stored:,d} || "
            f"all params: {counts.total:,d} || trainable%: {100 * counts.trainable / max(counts.total, 1):.4f}")
    print(line)
    return line
